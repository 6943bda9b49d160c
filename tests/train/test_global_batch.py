"""The same global batch gives the same run however it is split: 1 process x batch 4, 1 x 2 with accumulation 2,
2 x 2, 2 x 1 with accumulation 2 and 4 x 1 train the same adapter (tiny Llama, fp32, dropout 0), and a
checkpoint written by one split resumes on another as the same run.

The completions differ in length, so the micro-batches hold different token counts: only a loss normalised over
the global batch's tokens (not per micro-batch or per rank) makes the splits agree.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from test_distributed import adapter, max_diff, torchrun, train_losses

from loratune.train import fit
from loratune.train.run_config import validate_config

STEPS, CHECKPOINT_AT, TOLERANCE = 8, 4, 1e-5  # 22 training examples, 5 global batches an epoch: 8 steps wrap
WORDS = "good bad great awful movie film plot acting review".split()


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("splits")
    rows = [{"prompt": f"the {WORDS[i % 9]} {WORDS[(i * 4) % 9]} :",
             "completion": " ".join(WORDS[(i * 7 + j) % 9] for j in range(1 + i % 5))} for i in range(30)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root, tiny_llama


def config(job, name: str, batch_size: int, grad_accum: int = 1) -> dict:
    root, model = job
    return {
        "model": {"name": model},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"]},
        "data": {"train": str(root / "data.jsonl"), "format": "prompt_completion", "validation_fraction": 0.25,
                 "max_length": 32},
        "train": {"max_steps": STEPS, "batch_size": batch_size, "grad_accum": grad_accum, "learning_rate": 0.01,
                  "precision": "fp32", "eval_batch_size": 8, "seed": 0, "checkpoint_every": CHECKPOINT_AT,
                  "keep_checkpoints": 5},
        "output_dir": str(root / name),
    }


def in_process(job, name: str, batch_size: int, grad_accum: int = 1, resume: bool = False) -> Path:
    fit(validate_config(config(job, name, batch_size, grad_accum), "test"), resume=resume, quiet=True)
    return job[0] / name


def under_torchrun(job, name: str, processes: int, batch_size: int, grad_accum: int = 1,
                   resume: bool = False) -> Path:
    path = job[0] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config(job, name, batch_size, grad_accum)), encoding="utf-8")
    agent = torchrun("--standalone", f"--nproc_per_node={processes}", "-m", "loratune", "train", str(path),
                     "--quiet", *(["--resume"] if resume else []), cwd=job[0])
    _, stderr = agent.communicate(timeout=600)
    assert agent.returncode == 0, stderr[-3000:]
    return job[0] / name


def stopped_copy(job, source: Path, name: str) -> None:
    """What a run stopped after its step-4 checkpoint leaves behind, under another output folder."""
    shutil.copytree(source / "checkpoints" / f"step-{CHECKPOINT_AT}",
                    job[0] / name / "checkpoints" / f"step-{CHECKPOINT_AT}")


@pytest.fixture(scope="module")
def reference(job):
    """One process, batch 4: the run every split must equal."""
    return in_process(job, "1x4", 4)


@pytest.fixture(scope="module")
def two_by_two(job):
    return under_torchrun(job, "2x2", 2, 2)


def assert_same_run(out: Path, reference: Path) -> None:
    assert max_diff(adapter(out), adapter(reference)) <= TOLERANCE
    steps, losses = zip(*train_losses(out))
    assert list(steps) == list(range(1, STEPS + 1))
    assert list(losses) == pytest.approx([loss for _, loss in train_losses(reference)], abs=TOLERANCE)


def test_one_process_with_accumulation_equals_one_big_batch(job, reference):
    assert_same_run(in_process(job, "1x2x2", 2, 2), reference)


def test_two_processes_equal_one(job, reference, two_by_two):
    assert_same_run(two_by_two, reference)
    assert_same_run(under_torchrun(job, "2x1x2", 2, 1, 2), reference)


def test_four_processes_equal_one(job, reference):
    assert_same_run(under_torchrun(job, "4x1", 4, 1), reference)


def test_a_checkpoint_resumes_on_another_split(job, reference, two_by_two):
    """2 x 2's checkpoint resumed on 1 x 4 and on 1 x 2 x 2; 1 x 4's resumed on 2 x 2 (torchrun)."""
    for name, batch_size, grad_accum in (("2x2-on-1x4", 4, 1), ("2x2-on-1x2x2", 2, 2)):
        stopped_copy(job, two_by_two, name)
        assert_same_run(in_process(job, name, batch_size, grad_accum, resume=True), reference)
    stopped_copy(job, reference, "1x4-on-2x2")
    assert_same_run(under_torchrun(job, "1x4-on-2x2", 2, 2, resume=True), reference)
