"""SIGTERM and SIGINT end a run with a checkpoint and a message saying how to resume; resuming then ends
exactly where an uninterrupted run does."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

import loratune.train.loop as loop
from loratune.train import fit
from loratune.train.run_config import validate_config
from loratune.train.stop_signals import RunStopped, stop_requests

# The real command in its own process; each step waits a little first, so a signal lands mid-run.
SLOW_CLI = """
import sys, time
import loratune.train.loop as loop
real_step = loop.train_step
def slow_step(*args, **kwargs):
    time.sleep(0.4)
    return real_step(*args, **kwargs)
loop.train_step = slow_step
from loratune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def wait_for_first_step(metrics, process, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if metrics.is_file() and '"kind": "train"' in metrics.read_text():
            return
        time.sleep(0.05)
    raise AssertionError("the run did no step in time")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_finishes_the_step_saves_and_resume_matches_an_uninterrupted_run(run_config, tmp_path, sig, code):
    settings = {"train": {"max_steps": 8}}
    fit(validate_config(run_config(**settings, output_dir=str(tmp_path / "straight")), "t"), quiet=True)
    expected = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")

    out = tmp_path / "stopped"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(**settings, output_dir=str(out))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-c", SLOW_CLI, "train", str(config), "--quiet"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_first_step(out / "metrics.jsonl", process)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    step = steps[-1]
    assert 1 <= step < 8 and steps == list(range(1, step + 1))
    name = sig.name
    assert err.splitlines() == [
        f"loratune: {name} received: finishing this step and saving a checkpoint (Ctrl-C again stops at once)",
        f"loratune: stopped by {name} after step {step}; checkpoint {out}/checkpoints/step-{step} saved; "
        f"resume with `loratune train {config} --resume`",
    ]
    assert (out / "checkpoints" / f"step-{step}" / "trainer_state.pt").is_file()
    assert not (out / "adapter").exists()

    fit(validate_config(yaml.safe_load(config.read_text()), "t"), resume=True, quiet=True)
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key


def test_a_stop_before_training_begins_leaves_no_folder(run_config, tmp_path, monkeypatch):
    real_prepare = loop.prepare

    def prepare_then_terminate(*args, **kwargs):
        session = real_prepare(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return session

    monkeypatch.setattr(loop, "prepare", prepare_then_terminate)
    with pytest.raises(RunStopped) as stopped:
        fit(validate_config(run_config(), "t"), quiet=True)
    assert str(stopped.value) == "stopped by SIGTERM before training began; nothing was saved"
    assert stopped.value.exit_code == 143 and not (tmp_path / "run").exists()


def test_a_second_ctrl_c_stops_at_once_and_the_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with stop_requests() as stops:
            os.kill(os.getpid(), signal.SIGINT)
            assert stops.signal_name == "SIGINT"
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
