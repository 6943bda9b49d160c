"""Forgetting measured: perplexity on general text before and after training, for causal LMs."""

import math

import pytest
import torch

from loratune.core.errors import ConfigError
from loratune.core.peft_format import load_adapter
from loratune.pretrained import load_model
from loratune.train import fit
from loratune.train.forgetting import general_blocks, read_general_text
from loratune.train.run_config import validate_config


@torch.no_grad()
def plain_perplexity(model, blocks):
    """Token-weighted perplexity from one plain forward per block."""
    total, count = 0.0, 0
    for block in blocks:
        ids = torch.tensor([block["input_ids"]])
        logits = model(input_ids=ids).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return math.exp(total / count)


def test_a_causal_run_reports_general_perplexity_before_and_after(run_config, tmp_path, tiny_gpt2):
    text = tmp_path / "general.txt"
    text.write_text("the cat sat on a mat . the dog ran . hello world ! " * 6, encoding="utf-8")
    data = run_config(train={"max_steps": 20, "learning_rate": 0.03, "general_text": str(text)})
    summary = fit(validate_config(data, "test"), quiet=True)
    model, tokenizer = load_model(tiny_gpt2, "causal-lm")
    blocks = general_blocks(text.read_text(), tokenizer, 32)
    assert len(blocks) == 3  # 78 tokens in blocks of data.max_length (32)
    expected = plain_perplexity(model, blocks)
    assert summary["before"]["general_perplexity"] == pytest.approx(expected, rel=1e-4)
    model.eval()
    load_adapter(model, tmp_path / "run" / "adapter")
    trained = plain_perplexity(model, blocks)  # (how far training moves it depends on the run's dropout draws)
    assert trained != expected and summary["after"]["general_perplexity"] == pytest.approx(trained, rel=1e-4)
    assert "| general_perplexity |" in (tmp_path / "run" / "report.md").read_text()


def test_the_builtin_sample_is_used_by_default_and_null_turns_it_off(run_config, tmp_path):
    assert len(read_general_text("builtin")) > 2000
    on = fit(validate_config(run_config(train={"max_steps": 1}), "test"), quiet=True)
    assert on["before"]["general_perplexity"] > 1.0
    off = fit(validate_config(run_config(train={"max_steps": 1, "general_text": None},
                                         output_dir=str(tmp_path / "off")), "test"), quiet=True)
    assert "general_perplexity" not in off["before"] and "general_perplexity" not in off["after"]


def test_a_missing_general_text_file_is_named_before_loading(run_config, tmp_path):
    with pytest.raises(ConfigError, match=r"^run.yaml: train.general_text: no such file: '.*nope.txt'"):
        validate_config(run_config(train={"general_text": str(tmp_path / "nope.txt")}), "run.yaml")
