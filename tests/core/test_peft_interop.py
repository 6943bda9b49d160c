"""Adapters move between loratune and PEFT in both directions with the same logits (max abs diff <= 1e-5, fp32).

Each test prints its max abs diff (`pytest -s` shows them).
"""

from __future__ import annotations

import peft
import pytest
import tiny_models as tm
import torch
from tiny_models import input_ids, max_diff

from loratune import LoraConfig, add_adapter, load_adapter, save_adapter

TOLERANCE = 1e-5

FAMILIES = {
    # name: (builder, LoRA settings, task type)
    "gpt2": (tm.gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"]), "CAUSAL_LM"),
    "llama": (tm.llama, dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]),
              "CAUSAL_LM"),
    "bert": (tm.bert_classifier, dict(target_modules=["query", "value", "dense"], modules_to_save=["classifier"]),
             "SEQ_CLS"),
}
VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "rslora": {"use_rslora": True, "lora_alpha": 6}}


def _settings(family: str, variant: str) -> tuple[dict, str]:
    _, settings, task_type = FAMILIES[family]
    return {"r": 4, "lora_alpha": 8, **settings, **VARIANTS[variant]}, task_type


def _batch(family: str) -> dict[str, torch.Tensor]:
    ids = input_ids(batch=2, length=8)
    labels = torch.tensor([2, 0]) if family == "bert" else ids
    return {"input_ids": ids, "labels": labels}


def _train(model: torch.nn.Module, family: str, steps: int = 3) -> None:
    """A few AdamW steps, so that every factor (and DoRA magnitude, and the head) moves off its init."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    optimizer = torch.optim.AdamW(params, lr=2e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**_batch(family)).loss.backward()
        optimizer.step()
    model.eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_batch("any")["input_ids"]).logits


def _report(direction: str, family: str, variant: str, diff: float) -> None:
    print(f"\nINTEROP {direction:16s} {family:6s} {variant:7s} max_abs_diff={diff:.3e}")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_loratune_adapter_loads_in_peft(family, variant, tmp_path):
    settings, task_type = _settings(family, variant)
    build = FAMILIES[family][0]
    model = build()
    base = _logits(model)
    add_adapter(model, LoraConfig(init_lora_weights=False, task_type=task_type, **settings))
    _train(model, family)
    ours = _logits(model)
    assert max_diff(ours, base) > 1e-3
    save_adapter(model, tmp_path)

    theirs = peft.PeftModel.from_pretrained(build(), tmp_path)
    theirs.eval()
    assert theirs.peft_config["default"].use_dora == settings.get("use_dora", False)
    assert theirs.peft_config["default"].use_rslora == settings.get("use_rslora", False)
    diff = max_diff(_logits(theirs), ours)
    _report("loratune->peft", family, variant, diff)
    assert diff <= TOLERANCE


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_peft_adapter_loads_in_loratune(family, variant, tmp_path):
    settings, task_type = _settings(family, variant)
    build = FAMILIES[family][0]
    base = _logits(build())
    theirs = peft.get_peft_model(build(), peft.LoraConfig(init_lora_weights=False, task_type=task_type, **settings))
    _train(theirs, family)
    expected = _logits(theirs)
    assert max_diff(expected, base) > 1e-3
    theirs.save_pretrained(tmp_path)

    model = build()
    load_adapter(model, tmp_path)
    config = model.lora_configs["default"]
    assert (config.use_dora, config.use_rslora) == (settings.get("use_dora", False), settings.get("use_rslora", False))
    diff = max_diff(_logits(model), expected)
    _report("peft->loratune", family, variant, diff)
    assert diff <= TOLERANCE


def test_peft_all_linear_adapter_loads_in_loratune(tmp_path):
    """PEFT writes all-linear out as full paths; loratune reads them as exact names."""
    theirs = peft.get_peft_model(tm.opt(), peft.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    expected = _logits(theirs)
    theirs.save_pretrained(tmp_path)
    model = tm.opt()
    load_adapter(model, tmp_path)
    diff = max_diff(_logits(model), expected)
    _report("peft->loratune", "opt", "all-lin", diff)
    assert diff <= TOLERANCE
