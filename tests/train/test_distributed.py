"""Training under torchrun on CPU (gloo): 2 processes equal 1, two nodes equal one, resume across process
counts, one copy of the outputs, a killed rank ends the job, errors said once.

The base model and the adapter have no dropout here: with dropout every rank draws its own masks, so runs
with different process counts cannot be equal, only statistically alike.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

import loratune
from loratune.core.errors import WriteError
from loratune.train import checkpoint, fit
from loratune.train.run_config import validate_config

STEPS, CHECKPOINT_AT = 6, 3
SRC = str(Path(loratune.__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_gpt2):
    """A folder with a dropout-free tiny GPT-2 (the shared tiny GPT-2's tokenizer) and a data file."""
    root = tmp_path_factory.mktemp("distributed")
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    tokenizer.save_pretrained(root / "gpt2")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(root / "gpt2")
    rows = [{"text": f"the {t}", "label": "positive"} for t in ("good movie", "great film", "good acting")] + \
           [{"text": f"the {t}", "label": "negative"} for t in ("bad movie", "awful film", "bad acting")]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 6), encoding="utf-8")
    return root


def run_config(root: Path, name: str, **train) -> dict:
    return {
        "model": {"name": str(root / "gpt2")},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["c_attn", "c_fc"]},
        "data": {"train": str(root / "data.jsonl"), "format": "classification",
                 "prompt_template": "{text} sentiment :", "completion_template": "{label}",
                 "validation_fraction": 0.25, "max_length": 32},
        "train": {"max_steps": STEPS, "batch_size": 2, "learning_rate": 0.01, "precision": "fp32",
                  "eval_batch_size": 8, "max_new_tokens": 2, "seed": 0, "checkpoint_every": CHECKPOINT_AT,
                  "keep_checkpoints": 5, **train},
        "output_dir": str(root / name),
    }


def write_config(root: Path, name: str, **train) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(run_config(root, name, **train)), encoding="utf-8")
    return path


def environment() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([SRC, env.get("PYTHONPATH", "")])
    return env


def torchrun(*args: str, cwd: Path, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", *args]
    return subprocess.Popen(command, cwd=cwd, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def loratune_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loratune", *args], cwd=cwd, env=environment(),
                          capture_output=True, text=True, timeout=600)


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def train_losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(job):
    """`loratune train --nproc 2`: batch 2 per process, no accumulation (global batch 4), checkpoint at step 3."""
    result = loratune_cli("train", str(write_config(job, "two")), "--nproc", "2", "--quiet", cwd=job)
    assert result.returncode == 0, result.stderr[-3000:]
    return job / "two", result


@pytest.fixture(scope="module")
def one_process(job):
    """One process, batch 2 with 2 accumulation steps: the same global batch of 4."""
    fit(validate_config(run_config(job, "one", grad_accum=2), "test"), quiet=True)
    return job / "one"


def test_two_processes_equal_one_and_write_one_copy(two_processes, one_process):
    out, result = two_processes
    assert max_diff(adapter(out), adapter(one_process)) <= 1e-5
    assert [step for step, _ in train_losses(out)] == list(range(1, STEPS + 1))  # each step recorded once
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one_process.iterdir())
    assert not [p for p in out.rglob(".*")]  # no temporary leftovers from a second writer
    assert result.stdout.count("trained 6 steps") == 1
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["global_batch"] == {"examples": 4, "per_process": 2, "processes": 2, "grad_accum": 1}
    assert "global batch: 4 examples per step (2 per process x 2 process(es)" in (out / "report.md").read_text()


def test_two_nodes_equal_one_node(job, two_processes):
    """Two torchrun agents, one process each, meeting at a loopback c10d rendezvous."""
    config, port = write_config(job, "nodes"), free_port()
    agents = [torchrun("--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}", "--rdzv_backend=c10d",
                       f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=loratune-test", "-m", "loratune", "train",
                       str(config), "--quiet", cwd=job) for rank in (0, 1)]
    for agent in agents:
        _, stderr = agent.communicate(timeout=600)
        assert agent.returncode == 0, stderr[-3000:]
    expected = adapter(two_processes[0])
    for key, value in adapter(job / "nodes").items():
        assert torch.equal(value, expected[key]), key


@pytest.fixture(scope="module")
def stopped_at_step_3(job, two_processes):
    """The output folder of the 2-process run as it stood after its step-3 checkpoint: what a run stopped
    there leaves behind (checkpoint step-3 is written before step 4 starts)."""
    def copy(name: str) -> Path:
        out = job / name
        shutil.copytree(two_processes[0] / "checkpoints" / f"step-{CHECKPOINT_AT}",
                        out / "checkpoints" / f"step-{CHECKPOINT_AT}")
        return out
    return copy


def test_resume_with_two_processes_is_bit_identical(job, two_processes, stopped_at_step_3):
    out = stopped_at_step_3("resumed-two")
    agent = torchrun("--standalone", "--nproc_per_node=2", "-m", "loratune", "train",
                     str(write_config(job, "resumed-two")), "--resume", "--quiet", cwd=job)
    _, stderr = agent.communicate(timeout=600)
    assert agent.returncode == 0, stderr[-3000:]
    expected = adapter(two_processes[0])
    for key, value in adapter(out).items():
        assert torch.equal(value, expected[key]), key
    assert train_losses(out) == train_losses(two_processes[0])


def test_resume_with_one_process_matches(job, two_processes, stopped_at_step_3):
    out = stopped_at_step_3("resumed-one")
    fit(validate_config(run_config(job, "resumed-one", grad_accum=2), "test"), resume=True, quiet=True)
    assert max_diff(adapter(out), adapter(two_processes[0])) <= 1e-5
    assert [step for step, _ in train_losses(out)] == list(range(1, STEPS + 1))


def test_resume_refuses_another_global_batch(job, stopped_at_step_3):
    stopped_at_step_3("resumed-wrong")
    with pytest.raises(loratune.core.errors.LoratuneError, match="global batch of 4 .* now it is 2"):
        fit(validate_config(run_config(job, "resumed-wrong"), "test"), resume=True, quiet=True)


@pytest.fixture(scope="module")
def fsdp_run(job):
    """Two processes with FSDP2, uninterrupted, writing sharded checkpoints at step 3 and 6."""
    agent = torchrun("--standalone", "--nproc_per_node=2", "-m", "loratune", "train",
                     str(write_config(job, "fsdp", distributed="fsdp")), "--quiet", cwd=job)
    _, stderr = agent.communicate(timeout=600)
    assert agent.returncode == 0, stderr[-3000:]
    return job / "fsdp"


def test_fsdp_equals_one_process(fsdp_run, one_process):
    assert max_diff(adapter(fsdp_run), adapter(one_process)) <= 1e-5
    assert json.loads((fsdp_run / "adapter" / "adapter_config.json").read_text())["r"] == 4
    checkpoint = fsdp_run / "checkpoints" / f"step-{CHECKPOINT_AT}"
    assert sorted(p.name for p in (checkpoint / "optimizer").iterdir()) == [".metadata", "__0_0.distcp",
                                                                          "__1_0.distcp"]  # one shard a rank
    assert not [p for p in fsdp_run.rglob(".*") if p.name != ".metadata"]  # no temporary folder left


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_fsdp_shards_a_quantized_base_and_equals_one_process(job, quantize):
    """Each rank holds its shard of the quantized codes and scales; the run equals one quantized process."""
    name = f"fsdp-{quantize}"
    data = run_config(job, name, distributed="fsdp", checkpoint_every=0, max_steps=3)
    data["model"]["quantize"] = quantize
    (job / f"{name}.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    agent = torchrun("--standalone", "--nproc_per_node=2", "-m", "loratune", "train", str(job / f"{name}.yaml"),
                     "--quiet", cwd=job)
    _, stderr = agent.communicate(timeout=600)
    assert agent.returncode == 0, stderr[-3000:]
    data.update(output_dir=str(job / f"one-{quantize}"))
    data["train"].update(grad_accum=2, distributed="ddp")
    fit(validate_config(data, "test"), quiet=True)
    assert max_diff(adapter(job / name), adapter(job / f"one-{quantize}")) <= 1e-5
    (steps, losses), (one_steps, one_losses) = (zip(*train_losses(job / n)) for n in (name, f"one-{quantize}"))
    assert steps == one_steps and losses == pytest.approx(one_losses, abs=1e-5)


# Two ranks shard a block holding an NF4 layer: each keeps half of the codes and scales, and the sharded
# forward and input gradient equal the whole layer's.
SHARD_QUANTIZED = """
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from loratune.quant.linear import QuantLinear
from loratune.train.distributed import quantized_as_parameters
dist.init_process_group("gloo")
torch.manual_seed(0)
weight, x = torch.randn(64, 128), torch.randn(3, 128, requires_grad=True)
whole = QuantLinear.from_weight(weight, None, "nf4")
block = torch.nn.Sequential(QuantLinear.from_weight(weight, None, "nf4"))  # the same codes: quantizing is exact
expected = whole(x)
(grad,) = torch.autograd.grad(expected.sum(), x)
quantized_as_parameters(block)
fully_shard(block)
out = block(x)
(sharded_grad,) = torch.autograd.grad(out.sum(), x)
local = {k: (p.to_local().numel(), p.numel()) for k, p in block[0].named_parameters()}
assert set(local) == {"data", "scales", "scale_scales"}, local
assert all(2 * mine <= whole_size + 1 for mine, whole_size in local.values()), local
assert torch.equal(out, expected) and torch.allclose(sharded_grad, grad, atol=1e-6)
print("rank", dist.get_rank(), "holds", local)
dist.destroy_process_group()
"""


def test_fsdp_ranks_each_hold_a_shard_of_the_quantized_codes(job):
    script = job / "shard_quantized.py"
    script.write_text(SHARD_QUANTIZED, encoding="utf-8")
    agent = torchrun("--standalone", "--nproc_per_node=2", str(script), cwd=job)
    stdout, stderr = agent.communicate(timeout=600)
    assert agent.returncode == 0, stderr[-3000:]
    assert stdout.count("holds") == 2, stdout


def test_sharded_optimizer_state_round_trips_and_a_failed_checkpoint_leaves_nothing(tmp_path, monkeypatch):
    """One process through the same code: the optimizer state read back equals what was written, and a
    checkpoint whose adapter cannot be written after the shards were leaves neither it nor a temporary folder."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    monkeypatch.setattr(checkpoint, "save_trainable", lambda *args: None)
    path = checkpoint.save_checkpoint(tmp_path, 3, model, "default", {}, keep=2, sharded_optimizer=optimizer)
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    checkpoint.load_optimizer_shards(path / checkpoint.OPTIMIZER_SHARDS, model, fresh)
    for param in model.parameters():
        for key, value in optimizer.state[param].items():
            assert torch.equal(fresh.state[param][key], value), key

    def full_disk(*args):
        raise WriteError("adapter_model.safetensors: no space left on device")
    monkeypatch.setattr(checkpoint, "save_trainable", full_disk)
    with pytest.raises(WriteError, match="no space left"):
        checkpoint.save_checkpoint(tmp_path, 6, model, "default", {}, keep=2, sharded_optimizer=optimizer)
    assert [p.name for p in tmp_path.iterdir()] == ["step-3"]


# The real command under torchrun; each step waits a little first, so a signal lands mid-run.
SLOW_TRAIN = """
import sys, time
import loratune.train.loop as loop
real_step = loop.train_step
def slow_step(*args, **kwargs):
    time.sleep(0.5)
    return real_step(*args, **kwargs)
loop.train_step = slow_step
from loratune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_fsdp_stopped_by_sigterm_resumes_on_one_and_two_processes(job, fsdp_run):
    """SIGTERM to torchrun's agent (what a scheduler sends) after the step-3 checkpoint: every rank finishes
    its step and writes its shard of a last checkpoint; that resumes on 2 processes and on 1."""
    out, script = job / "fsdp-stopped", job / "slow_train.py"
    script.write_text(SLOW_TRAIN, encoding="utf-8")
    agent = torchrun("--standalone", "--nproc_per_node=2", str(script), "train",
                     str(write_config(job, "fsdp-stopped", distributed="fsdp")), "--quiet", cwd=job)
    deadline = time.monotonic() + 600
    while not (out / "checkpoints" / f"step-{CHECKPOINT_AT}" / "checkpoint.json").is_file():
        assert agent.poll() is None and time.monotonic() < deadline, agent.communicate()[1][-3000:]
        time.sleep(0.05)
    agent.send_signal(signal.SIGTERM)
    _, stderr = agent.communicate(timeout=120)
    assert "stopped by SIGTERM after step" in stderr, stderr[-3000:]
    stopped = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))
    assert CHECKPOINT_AT <= stopped < STEPS and not (out / "adapter").exists()
    for processes in (2, 1):
        resumed = job / f"fsdp-resumed-on-{processes}"
        shutil.copytree(out, resumed)
        if processes == 2:
            again = torchrun("--standalone", "--nproc_per_node=2", "-m", "loratune", "train",
                             str(write_config(job, resumed.name, distributed="fsdp")), "--resume", "--quiet", cwd=job)
            _, stderr = again.communicate(timeout=600)
            assert again.returncode == 0, stderr[-3000:]
        else:
            fit(validate_config(run_config(job, resumed.name, grad_accum=2), "test"), resume=True, quiet=True)
        # (a resume that dropped the optimizer state ends 1.3e-2 away: the state is read back, shards and all)
        assert max_diff(adapter(resumed), adapter(fsdp_run)) <= 1e-5, (stopped, processes)
        assert [step for step, _ in train_losses(resumed)] == list(range(1, STEPS + 1))


def test_a_killed_rank_ends_the_job_with_a_message(job):
    out = job / "killed"
    agent = torchrun("--standalone", "--nproc_per_node=2", "-m", "loratune", "train",
                     str(write_config(job, "killed", max_steps=10**6, checkpoint_every=0, distributed_timeout=60)),
                     "--quiet", cwd=job)
    deadline = time.monotonic() + 600
    while not (out / "metrics.jsonl").is_file() or '"train"' not in (out / "metrics.jsonl").read_text():
        assert agent.poll() is None and time.monotonic() < deadline, agent.communicate()[1][-3000:]
        time.sleep(0.5)
    os.kill(rank_pid(agent.pid, 1), signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = agent.communicate(timeout=120)
    assert time.monotonic() - killed < 60  # the job's timeout; torchrun notices a dead rank in seconds
    assert agent.returncode != 0
    assert "rank      : 1 (local_rank: 1)" in stderr and "SIGKILL" in stderr


def rank_pid(agent: int, rank: int) -> int:
    """The process of `rank` among the agent's children (torchrun sets RANK in each one's environment)."""
    children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    for child in children:
        variables = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in variables:
            return int(child)
    raise AssertionError(f"no rank {rank} among {children}")


def test_a_data_error_is_reported_once_before_any_model_loads(job):
    (job / "broken.jsonl").write_text('{"text": "the good movie", "label": "positive"}\n{not json\n')
    data = run_config(job, "broken")
    data["model"]["name"] = str(job / "no-such-model")  # loading it would fail: the data error comes first
    data["data"]["train"] = str(job / "broken.jsonl")
    (job / "broken.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    agent = torchrun("--standalone", "--nproc_per_node=2", "-m", "loratune", "train", str(job / "broken.yaml"),
                     "--quiet", cwd=job)
    _, stderr = agent.communicate(timeout=600)
    assert agent.returncode != 0
    errors = [line for line in stderr.splitlines() if line.startswith("loratune: error:")]
    assert len(errors) == 1 and "broken.jsonl" in errors[0], stderr[-3000:]
    assert not (job / "broken").exists()


def launcher(*args: str, cwd: Path) -> subprocess.Popen:
    """`loratune train --nproc 2 ...` as a user starts it."""
    return subprocess.Popen([sys.executable, "-m", "loratune", "train", *args, "--nproc", "2", "--quiet"], cwd=cwd,
                            env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def descendants(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children] + [d for c in children for d in descendants(int(c))]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launcher_stops_every_rank_with_a_checkpoint(job, signum):
    """Issue 27: SIGTERM ended `loratune train --nproc 2` at once while torchrun and its ranks trained on, with
    no checkpoint and the folder's lock held. Now the ranks checkpoint and end, as one process does."""
    name = f"stopped-{signum.name}"
    out = job / name
    config = write_config(job, name, max_steps=10**6, checkpoint_every=0)
    agent = launcher(str(config), cwd=job)
    deadline = time.monotonic() + 600
    while not (out / "metrics.jsonl").is_file() or '"train"' not in (out / "metrics.jsonl").read_text():
        assert agent.poll() is None and time.monotonic() < deadline, agent.communicate()[1][-3000:]
        time.sleep(0.5)
    ranks = descendants(agent.pid)
    assert len(ranks) >= 2
    agent.send_signal(signum)
    _, stderr = agent.communicate(timeout=300)
    assert agent.returncode == 128 + signum, stderr[-3000:]
    assert not [pid for pid in ranks if alive(pid)], "a rank outlived the launcher"
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and (checkpoints[0] / "checkpoint.json").is_file()
    assert not (out / ".loratune.lock").exists()
    stopped = [line for line in stderr.splitlines() if line.startswith(f"loratune: stopped by {signum.name}")]
    assert len(stopped) == 1 and "Traceback" not in stderr, stderr[-3000:]
    resume = stopped[0].split("resume with `", 1)[1].rstrip("`")
    assert resume == f"loratune train {config} --nproc 2 --resume"


def test_the_printed_resume_command_works_as_printed(job, stopped_at_step_3, two_processes):
    """It carries --nproc 2, so the global batch of the checkpoint is kept (without it, resume is refused)."""
    out = stopped_at_step_3("resumed-as-printed")
    config = write_config(job, "resumed-as-printed")
    finished = subprocess.run([sys.executable, "-m", "loratune", "train", str(config), "--nproc", "2", "--resume",
                               "--quiet"], cwd=job, env=environment(), capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    expected = adapter(two_processes[0])
    for key, value in adapter(out).items():
        assert torch.equal(value, expected[key]), key


def test_an_error_under_the_launcher_is_one_line_and_exit_2(job):
    """Issue 27: one process gives exit 2 and one line; under --nproc 2 torchrun added its ChildFailedError
    traceback and exit 1."""
    (job / "broken2.jsonl").write_text('{"text": "the good movie", "label": "positive"}\n{not json\n')
    data = run_config(job, "broken2")
    data["data"]["train"] = str(job / "broken2.jsonl")
    (job / "broken2.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    agent = launcher(str(job / "broken2.yaml"), cwd=job)
    _, stderr = agent.communicate(timeout=600)
    assert agent.returncode == 2
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("loratune: error: ") and "broken2.jsonl" in lines[0], stderr
    assert not (job / "broken2").exists()


def test_the_launchers_exit_code_is_the_rank_that_failed_on_its_own(capsys):
    """A rank's own exit code wins over a peer the agent stopped afterwards; a rank killed by a signal is one
    line naming it, since no rank could say it."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from loratune.launch import _exit_code

    def failed(**codes: int) -> ChildFailedError:
        failures = {int(rank[1:]): ProcessFailure(int(rank[1:]), 1000 + int(rank[1:]), code, "<none>")
                    for rank, code in codes.items()}
        return ChildFailedError("loratune", failures)

    assert _exit_code(failed(r0=-15, r1=2)) == 2 and capsys.readouterr().err == ""
    assert _exit_code(failed(r0=-9, r1=-15)) == 137
    assert capsys.readouterr().err == "loratune: error: rank 0 (pid 1000) was killed by SIGKILL; the job has ended\n"
