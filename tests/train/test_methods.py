"""Full fine-tuning and the head-only probe: the same trainer, checkpoints and resume as LoRA, a transformers
folder as the result."""

import json
import re

import pytest
import torch
from cli_tools import crash_after_checkpoint
from safetensors.torch import load_file

from loratune.core.errors import ConfigError
from loratune.pretrained import load_model
from loratune.train import evaluate_run, fit
from loratune.train.run_config import validate_config


def run(data, **kwargs):
    return fit(validate_config(data, "test"), quiet=True, **kwargs)


def test_full_fine_tuning_trains_every_weight_and_saves_a_model_folder_that_reloads(run_config, tmp_path,
                                                                                   tiny_gpt2):
    data = run_config(method="full", lora=None, train={"max_steps": 20, "learning_rate": 3e-3})  # no lora section
    summary = run(data)
    out = tmp_path / "run"
    assert summary["method"] == "full" and summary["trainable_fraction"] == 1.0
    assert summary["after"]["loss"] < summary["before"]["loss"] - 0.5
    assert not (out / "adapter").exists()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "report.md"):
        assert (out / ("" if name == "report.md" else "model") / name).is_file(), name
    assert "- method: full" in (out / "report.md").read_text()
    trained, _ = load_model(str(out / "model"), "causal-lm")
    base, _ = load_model(tiny_gpt2, "causal-lm")
    ids = torch.tensor([[5, 9, 12, 7]])
    with torch.no_grad():
        assert not torch.allclose(trained(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-3)
    again = evaluate_run(validate_config(data, "test"), quiet=True)  # `loratune eval` reads model/
    assert again["loss"] == pytest.approx(summary["after"]["loss"], rel=1e-5)
    assert again["accuracy"] == summary["after"]["accuracy"]


def test_a_full_fine_tuning_run_resumes_bit_for_bit(run_config, tmp_path, monkeypatch):
    settings = {"method": "full", "train": {"max_steps": 6, "checkpoint_every": 2, "learning_rate": 1e-3}}
    run(run_config(**settings, output_dir=str(tmp_path / "straight")))
    interrupted = run_config(**settings, output_dir=str(tmp_path / "resumed"))
    crash_after_checkpoint(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        run(interrupted)
    assert (tmp_path / "resumed" / "checkpoints" / "step-4" / "trainable.safetensors").is_file()
    monkeypatch.undo()
    run(interrupted, resume=True)
    expected = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_the_head_probe_trains_only_the_classifier(run_config, tmp_path, tiny_bert, sentiment_file):
    data = run_config(method="head", model={"name": tiny_bert, "task": "classification"},
                      data={"prompt_template": None, "completion_template": None},
                      train={"max_steps": 5, "learning_rate": 1e-2})
    summary = run(data)
    assert 0 < summary["trainable_fraction"] < 0.01
    trained = load_file(tmp_path / "run" / "model" / "model.safetensors")
    base = load_file(f"{tiny_bert}/model.safetensors")
    changed = {k for k in base if k in trained and not torch.equal(base[k], trained[k])}
    assert changed and all(k.startswith("classifier.") for k in changed)


@pytest.mark.parametrize(("method", "extra", "message"), [
    ("full", {"model": {"quantize": "nf4"}}, "method: full trains dense weights"),
    ("full", {"model": {"dtype": "bfloat16"}}, "method: full keeps float32 weights"),
    ("head", {}, "method: head (a linear probe) needs model.task: classification"),
    ("full", {"train": {"lora_plus_ratio": 4.0}}, "LoRA+ needs method: lora"),
    ("lora", {"lora": None}, "run.yaml: lora: required (the adapter's settings) unless method is full or head"),
])
def test_methods_refuse_what_they_cannot_combine_with(run_config, method, extra, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(run_config(method=method, **extra), "run.yaml")
