"""The output folder belongs to one run: a lock naming its process, no mixing with other files, no leftovers."""

import json
import os
import signal
import subprocess
import sys

import torch
import yaml
from cli_tools import error_line, write_config

from loratune.cli import main
from loratune.train.run_folder import LOCK_NAME

# Holds the folder lock the way a run does (an OS lock on .loratune.lock, the owner's pid inside),
# without loading torch, so the test does not wait for a second interpreter to import the package.
LOCK_HOLDER = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, json.dumps({"pid": os.getpid()}).encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_a_busy_folder_is_refused_naming_the_process_and_a_dead_ones_lock_is_taken_over(run_config, tmp_path,
                                                                                      capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out / LOCK_NAME)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        config = write_config(tmp_path, run_config, train={"max_steps": 2})
        assert error_line(capsys, ["train", config, "--quiet"]) == (
            f"loratune: error: output_dir {out} is in use by another loratune run (process {holder.pid}); "
            "wait for it to finish or choose another output_dir")
        assert sorted(os.listdir(out)) == [LOCK_NAME]  # nothing written beside the other run
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()

    assert main(["train", config, "--quiet"]) == 0  # its process is gone: the lock is stale
    assert capsys.readouterr().err == (f"loratune: warning: output_dir {out}: taking over the lock of process "
                                       f"{holder.pid}, which is no longer running\n")
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / LOCK_NAME).exists()


def test_a_run_in_progress_holds_its_folder(run_config, tmp_path, monkeypatch, capsys):
    """Two runs at once into one folder: the second is refused while the first trains, and the first ends whole."""
    import loratune.train.loop as loop

    out = tmp_path / "run"
    config = write_config(tmp_path, run_config, train={"max_steps": 3})
    real_step, answers = loop.train_step, []

    def step_then_start_another(*args, **kwargs):
        real_step(*args, **kwargs)
        if not answers:
            answers.append(main(["train", config, "--quiet"]))
            answers.append(capsys.readouterr().err)

    monkeypatch.setattr(loop, "train_step", step_then_start_another)
    assert main(["train", config, "--quiet"]) == 0
    assert answers[0] == 2
    assert answers[1].startswith(f"loratune: error: output_dir {out} is in use by another loratune run "
                                 f"(process {os.getpid()}, started ")
    assert answers[1].endswith("); wait for it to finish or choose another output_dir\n")
    assert answers[1].count("\n") == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]


def test_a_fresh_run_never_writes_beside_a_finished_run(run_config, tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path, run_config, train={"max_steps": 2})
    assert main(["train", config, "--quiet"]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert error_line(capsys, ["train", config, "--quiet", "--set", "lora.r=2"]) == (
        f"loratune: error: output_dir {out} is not empty (adapter, config.yaml, metrics.json and 3 more); "
        "a new run needs an empty or new folder, so choose another output_dir")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_output_dir_dot_never_overwrites_the_users_files(run_config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    mine = "# my run, with comments\n" + yaml.safe_dump(run_config(output_dir="."))
    (tmp_path / "config.yaml").write_text(mine)
    (tmp_path / "report.md").write_text("my notes\n")
    keep = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert error_line(capsys, ["train", "config.yaml", "--quiet"]) == (
        "loratune: error: output_dir . is not empty (config.yaml, report.md, sentiment.jsonl); a new run needs an "
        "empty or new folder, so choose another output_dir")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == keep


def test_leftovers_of_killed_writes_are_removed_at_the_next_start(run_config, tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path, run_config, train={"max_steps": 4, "checkpoint_every": 2})
    assert main(["train", config, "--quiet"]) == 0
    leftovers = [out / "checkpoints" / ".step-6.k2j3h4.tmp", out / "adapter" / ".adapter_model.safetensors.x1.tmp",
                 out / ".metrics.json.q9.tmp"]
    leftovers[0].mkdir()
    (leftovers[0] / "trainer_state.pt").write_bytes(b"half")
    for path in leftovers[1:]:
        path.write_bytes(b"half")
    assert main(["train", config, "--quiet", "--resume"]) == 0
    assert not [p for p in leftovers if p.exists()]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_run_stopped_before_its_first_checkpoint_starts_again_on_resume(run_config, tmp_path, capsys):
    from safetensors.torch import load_file

    from loratune.train.run_config import config_to_yaml, load_config

    config = write_config(tmp_path, run_config, train={"max_steps": 2})
    out = tmp_path / "run"
    out.mkdir()  # what a run killed before its first checkpoint leaves: its config and a partial metrics file
    (out / "config.yaml").write_text(config_to_yaml(load_config(config)))
    (out / "metrics.jsonl").write_text('{"kind": "eval", "step": 0}\n')
    (out / "checkpoints").mkdir()
    assert main(["train", config, "--quiet", "--resume"]) == 0
    assert "no complete checkpoint yet; starting again from step 0" in capsys.readouterr().err
    plain = write_config(tmp_path, run_config, name="plain.yaml", output_dir=str(tmp_path / "plain"),
                         train={"max_steps": 2})
    assert main(["train", plain, "--quiet"]) == 0
    resumed, uninterrupted = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (out, tmp_path / "plain"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_resume_into_a_folder_with_another_runs_config_and_no_checkpoint_is_refused(run_config, tmp_path, capsys):
    config = write_config(tmp_path, run_config, train={"max_steps": 2})
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("# somebody else's run\n")
    message = error_line(capsys, ["train", config, "--quiet", "--resume"])
    assert message == (f"loratune: error: output_dir {out} holds another run's config.yaml and no checkpoint; "
                       "choose another output_dir")
    assert (out / "config.yaml").read_text() == "# somebody else's run\n"
