"""The training loop end to end on tiny models: every task, outputs, resume, divergence, early stopping."""

import json

import pytest
import torch
from cli_tools import crash_after_checkpoint
from safetensors.torch import load_file

import loratune.train.loop as loop
import loratune.train.run_step as run_step
import loratune.train.session as session_module
from loratune.train import fit
from loratune.train.checkpoint import complete_checkpoints
from loratune.train.run_config import validate_config

# tiny GPT-2, seed 0, fp32 CPU (LoRA masks from loratune.core.lora_branch; each row's last token, which no label
# reads, not computed since `train.step.read_part`: fewer dropout draws)
PINNED_LOSSES = [3.65228, 3.56046, 3.68137]


def run(data):
    return fit(validate_config(data, "test"), quiet=True)


def test_causal_run_writes_every_output_and_learns(run_config, tmp_path):
    summary = run(run_config(train={"max_steps": 30, "learning_rate": 0.03}))
    out = tmp_path / "run"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.json",
                 "metrics.jsonl", "plot.png", "report.md", "config.yaml"):
        assert (out / name).is_file(), name
    assert summary["after"]["loss"] < summary["before"]["loss"] - 0.5
    assert {"accuracy", "macro_f1", "perplexity"} <= set(summary["after"])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(1, 31))
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "## Samples before training" in report and "| accuracy |" in report
    assert 0 < summary["trainable_fraction"] < 0.2
    # a tiny model fits: no checkpointing, and the run says why
    assert summary["gradient_checkpointing"].startswith("off (estimated peak without it")
    assert f"gradient checkpointing {summary['gradient_checkpointing']}" in report


def test_first_losses_are_pinned(run_config, tmp_path, monkeypatch):
    """Regression pin: same seed, same data, same numbers (fp32 on CPU: a GPU's RNG stream differs, so the
    run is kept on the CPU even where one is present)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run(run_config(train={"max_steps": 3}))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if r["kind"] == "train"]
    assert losses == pytest.approx(PINNED_LOSSES, abs=1e-4)


@pytest.mark.parametrize("variant", ["none", "nf4", "shared inputs"])
def test_resume_matches_an_uninterrupted_run_bit_for_bit(run_config, tmp_path, monkeypatch, variant, request):
    settings = {"model": {"quantize": "nf4" if variant == "nf4" else "none"},
                "train": {"max_steps": 6, "checkpoint_every": 2}}
    if variant == "shared inputs":  # Llama's q/k/v and gate/up run as one node each, learned before step 1
        settings["model"]["name"] = request.getfixturevalue("tiny_llama")
        settings["lora"] = {"lora_dropout": 0.0, "target_modules": "all-linear"}
    run(run_config(**settings, output_dir=str(tmp_path / "straight")))
    expected = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")

    interrupted = run_config(**settings, output_dir=str(tmp_path / "resumed"))
    crash_after_checkpoint(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        run(interrupted)
    monkeypatch.undo()
    fit(validate_config(interrupted, "test"), resume=True, quiet=True)
    resumed = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key
    def train_losses(out):
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]

    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")
    assert [step for step, _ in train_losses(tmp_path / "resumed")] == [1, 2, 3, 4, 5, 6]


def test_checkpoints_keep_the_last_k(run_config, tmp_path):
    run(run_config(train={"max_steps": 6, "checkpoint_every": 1, "keep_checkpoints": 2}))
    kept = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in kept] == ["step-5", "step-6"]
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(run_config, tmp_path, monkeypatch):
    real_loss = run_step.batch_loss
    calls = {"n": 0}

    def poisoned(model, batch, task, loss_chunk=0, prefix=0):
        loss, logits, weight = real_loss(model, batch, task, loss_chunk, prefix)
        calls["n"] += model.training
        return (loss * float("nan") if model.training and calls["n"] == 4 else loss), logits, weight

    monkeypatch.setattr(run_step, "batch_loss", poisoned)
    with pytest.raises(loop.TrainingDiverged, match="step 4"):
        run(run_config(train={"max_steps": 6, "checkpoint_every": 2}))
    assert [p.name for p in complete_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-2"]
    assert not (tmp_path / "run" / "adapter").exists()


def test_early_stopping(run_config):
    summary = run(run_config(train={"max_steps": 20, "learning_rate": 1e-9, "eval_every": 1,
                                    "early_stopping_patience": 2, "schedule": "constant"}))
    assert summary["stopped_early"] and summary["steps"] == 3


def test_classification_head_is_trained_and_saved(tiny_bert, sentiment_file, run_config, tmp_path):
    data = run_config(model={"name": tiny_bert, "task": "classification"},
                      lora={"target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
                      data={"prompt_template": None, "completion_template": None},
                      train={"max_steps": 40, "learning_rate": 0.05})
    summary = run(data)
    assert summary["after"]["accuracy"] == 1.0 > summary["before"]["accuracy"]
    assert summary["after"]["loss"] < 0.2
    keys = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors").keys()
    assert "base_model.model.classifier.weight" in keys


def test_seq2seq_translation_reports_bleu(tiny_t5, tmp_path, run_config):
    pairs = [("the cat", "el gato"), ("the dog", "el perro"), ("good", "bueno"), ("bad", "malo")] * 6
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in pairs))
    data = run_config(model={"name": tiny_t5, "task": "seq2seq"}, lora={"target_modules": ["q", "v"]},
                      data={"train": str(path), "format": "translation", "prompt_template": None,
                            "completion_template": None},
                      train={"max_steps": 4, "generation_eval": True})
    summary = run(data)
    assert {"bleu", "chrf", "loss"} <= set(summary["after"]) and summary["samples_after"]
    assert summary["after"]["loss"] < summary["before"]["loss"]


@pytest.mark.parametrize("fmt,rows", [
    ("text", [{"text": "the cat sat on a mat . the dog ran"}] * 20),
    ("instruction", [{"instruction": "review", "input": "the good movie", "output": "positive"}] * 20),
    ("prompt_completion", [{"prompt": "hello", "completion": "world"}] * 20),
    ("chat", [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}] * 20),
])
def test_each_generation_format_trains(fmt, rows, tmp_path, run_config):
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run(run_config(data={"train": str(path), "format": fmt, "prompt_template": None,
                                   "completion_template": None, "max_length": 16}, train={"max_steps": 5}))
    assert summary["after"]["loss"] < summary["before"]["loss"]
    assert summary["data"]["format"] == fmt


def test_lora_plus_gives_b_factors_a_higher_learning_rate(run_config):
    from loratune.train.optim import build_optimizer
    from loratune.train.session import prepare

    session = prepare(validate_config(run_config(), "test"), quiet=True)
    optimizer = build_optimizer(session.model, 1e-3, 0.0, 16.0)
    lrs = sorted(g["lr"] for g in optimizer.param_groups)
    assert lrs == pytest.approx([1e-3, 16e-3])
    b_params = {id(p) for n, p in session.model.named_parameters() if ".lora_B." in n}
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == b_params


def test_the_optimizer_is_torchs_fused_adamw_and_steps_as_the_plain_one_does(run_config):
    from loratune.train.optim import build_optimizer
    from loratune.train.session import prepare

    session = prepare(validate_config(run_config(), "test"), quiet=True)
    optimizer = build_optimizer(session.model, 1e-3, 0.01, 4.0)
    assert optimizer.defaults["fused"] is True
    params = [p for group in optimizer.param_groups for p in group["params"]]
    copies = [p.detach().clone().requires_grad_() for p in params]
    plain = torch.optim.AdamW([{"params": copies[:len(optimizer.param_groups[0]["params"])], "lr": 1e-3},
                               {"params": copies[len(optimizer.param_groups[0]["params"]):], "lr": 4e-3}],
                              weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, copy in zip(params, copies):
            p.grad = torch.randn(p.shape, generator=generator)
            copy.grad = p.grad.clone()
        optimizer.step()
        plain.step()
    for p, copy in zip(params, copies):
        torch.testing.assert_close(p, copy, rtol=1e-5, atol=1e-6)


def test_bf16_training_keeps_the_base_in_bf16_and_the_adapter_in_fp32(run_config):
    from loratune.train.session import prepare

    session = prepare(validate_config(run_config(train={"precision": "bf16"}), "test"), quiet=True)
    dtypes = {name: p.dtype for name, p in session.model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    fp32 = prepare(validate_config(run_config(), "test"), quiet=True)
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}


def test_a_fresh_run_refuses_an_earlier_runs_checkpoints(run_config):
    data = run_config(train={"max_steps": 2, "checkpoint_every": 2})
    run(data)
    with pytest.raises(loop.LoratuneError, match="checkpoints of an earlier run"):
        run(data)


def test_resume_refuses_a_changed_config(run_config, tmp_path):
    run(run_config(train={"max_steps": 2, "checkpoint_every": 2}))
    changed = validate_config(run_config(train={"max_steps": 2, "checkpoint_every": 2, "learning_rate": 0.5}), "t")
    with pytest.raises(loop.LoratuneError, match="train.learning_rate=0.01"):
        fit(changed, resume=True, quiet=True)


def test_divergence_names_no_checkpoint_when_none_was_written(run_config, tmp_path):
    data = run_config(train={"max_steps": 4, "learning_rate": 1e30, "max_grad_norm": None, "checkpoint_every": 2})
    with pytest.raises(loop.TrainingDiverged) as error:
        run(data)
    found = complete_checkpoints(tmp_path / "run" / "checkpoints")
    if found:  # whatever was kept must hold finite weights
        weights = load_file(found[-1] / "adapter_model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values())
        assert str(found[-1]) in str(error.value)
    else:
        assert "no checkpoint was written yet" in str(error.value)


def test_no_evaluation_data_reports_no_metrics(run_config, tmp_path):
    summary = run(run_config(data={"validation_fraction": 0.0}, train={"max_steps": 2}))
    assert summary["before"] == {} and summary["after"] == {}
    assert (tmp_path / "run" / "plot.png").is_file()


def test_freed_memory_goes_back_after_loading_and_each_evaluation_not_each_step(run_config, monkeypatch):
    """Freed heap pages are handed back at phase boundaries, so the evaluation after training does not stack on
    blocks the allocator kept; not after each step, whose successor would fault the same pages back in (the
    demo measured 8% more time per step for the same peak; see docs/benchmarks.md)."""
    calls = []
    monkeypatch.setattr(session_module, "release_free_memory", lambda: calls.append(1))
    steps = []
    original = loop.train_step

    def counted(run, order, progress):
        steps.append(len(calls))
        original(run, order, progress)

    monkeypatch.setattr(loop, "train_step", counted)
    run(run_config(train={"max_steps": 3}))
    # prepare once and the evaluation before training once, none per step, then the evaluation after training
    assert steps == [2, 2, 2]
    assert len(calls) == 3
