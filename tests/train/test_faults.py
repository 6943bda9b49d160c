"""Faults during and between runs: a full disk, a corrupt newest checkpoint, a tampered trainer state.

The full disk is simulated by making one write fail with the error the real one gives: safetensors' writer
on a full tmpfs raises `SafetensorError('Error while serializing: I/O error: No space left on device (os
error 28)')`, and a Python file write raises `OSError(28, 'No space left on device')`.
"""

import errno
import os
import pickle
from pathlib import Path

import torch
from cli_tools import error_line, write_config
from safetensors import SafetensorError
from safetensors.torch import load_file

import loratune.core.peft_format as peft_format
from loratune.cli import main

NO_SPACE = "Error while serializing: I/O error: No space left on device (os error 28)"


def test_a_full_disk_at_the_final_adapter_keeps_the_steps_in_a_checkpoint(run_config, tmp_path, monkeypatch,
                                                                           capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path, run_config, train=dict(max_steps=4))
    real_save = peft_format.save_file

    def disk_full_for_the_adapter(tensors, filename, metadata=None):
        if Path(filename).parent == out / "adapter":
            raise SafetensorError(NO_SPACE)
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(peft_format, "save_file", disk_full_for_the_adapter)
    assert error_line(capsys, ["train", config, "--quiet"]) == (
        f"loratune: error: cannot write {out}/adapter/adapter_model.safetensors: No space left on device; "
        f"the 4 trained steps are kept in checkpoint {out}/checkpoints/step-4: free space, then --resume writes "
        "the adapter")
    assert not (out / "adapter").exists()

    monkeypatch.setattr(peft_format, "save_file", real_save)  # space again
    assert main(["train", config, "--quiet", "--resume"]) == 0
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    kept = load_file(out / "checkpoints" / "step-4" / "adapter_model.safetensors")
    assert final.keys() == kept.keys() and all(torch.equal(final[k], kept[k]) for k in kept)


def test_a_full_disk_at_a_checkpoint_is_one_line_and_earlier_checkpoints_survive(run_config, tmp_path, monkeypatch,
                                                                                 capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path, run_config, train=dict(max_steps=6, checkpoint_every=2))
    real_write = Path.write_bytes

    def disk_full_at_step_4(self, data):
        if self.name == "trainer_state.pt" and self.parent.name.startswith(".step-4."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", disk_full_at_step_4)
    assert error_line(capsys, ["train", config, "--quiet"]) == (
        f"loratune: error: cannot write {out}/checkpoints/step-4/trainer_state.pt: No space left on device")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]


def test_resume_passes_over_a_corrupt_newest_checkpoint_with_a_warning(run_config, tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path, run_config, train=dict(max_steps=4, checkpoint_every=2))
    assert main(["train", config, "--quiet"]) == 0
    expected = load_file(out / "adapter" / "adapter_model.safetensors")
    newest = out / "checkpoints" / "step-4" / "adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[:200])  # truncated
    capsys.readouterr()
    assert main(["train", config, "--quiet", "--resume"]) == 0
    assert capsys.readouterr().err == (
        f"loratune: warning: checkpoint {out}/checkpoints/step-4 is unreadable ({newest}: corrupt or truncated "
        "safetensors file (Error while deserializing header: invalid header length)); "
        "trying the one before\n")
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")  # steps 3 and 4 again, from step 2
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_tampered_trainer_state_is_unreadable_and_nothing_in_it_runs(run_config, tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path, run_config, train=dict(max_steps=2, checkpoint_every=2))
    assert main(["train", config, "--quiet"]) == 0
    marker = tmp_path / "payload-ran"
    state = out / "checkpoints" / "step-2" / "trainer_state.pt"
    state.write_bytes(pickle.dumps({"state": _Payload(marker)}))
    capsys.readouterr()
    err = error_line(capsys, ["train", config, "--quiet", "--resume"])
    assert err.startswith(f"loratune: error: checkpoint {out}/checkpoints/step-2 is unreadable (trainer_state.pt: ")
    assert not marker.exists()
