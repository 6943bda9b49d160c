"""Adapter files: round trips, PEFT's exact key layout, atomic writes, and refusals that change nothing."""

from __future__ import annotations

import json
import os
import stat

import peft
import pytest
import tiny_models as tm
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import assert_unchanged, logits, max_diff, snapshot

from loratune import (
    AdapterFileError,
    AdapterNameError,
    LoraConfig,
    active_adapters,
    add_adapter,
    load_adapter,
    save_adapter,
    set_active_adapters,
)
from loratune.core.peft_format import CONFIG_NAME, WEIGHTS_NAME

ADAPTER_FILES = {CONFIG_NAME, WEIGHTS_NAME}


def _keys(directory) -> set[str]:
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as handle:
        return set(handle.keys())


def _perturb(model: torch.nn.Module) -> None:
    """Give every trainable tensor a distinct random value, as training would."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


# --- round trips ---------------------------------------------------------------------------------------------
CASES = {
    "gpt2-conv1d-embedding": (tm.gpt2, dict(target_modules=["c_attn", "c_fc", "wte"])),
    "llama-dora-rslora": (tm.llama, dict(target_modules="all-linear", use_dora=True, use_rslora=True,
                                         rank_pattern={"v_proj": 1}, alpha_pattern={"o_proj": 3})),
    "bert-head-bias": (tm.bert_classifier, dict(target_modules=["query", "value"], modules_to_save=["classifier"],
                                                bias="all", task_type="SEQ_CLS")),
    "t5-lora-only-bias": (tm.t5, dict(target_modules=["q", "v", "wi"], bias="lora_only")),
    "opt-layers": (tm.opt, dict(target_modules=["q_proj", "fc1"], layers_to_transform=[1], bias="lora_only")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_same_logits_under_any_name(case, tmp_path):
    build, kwargs = CASES[case]
    model = build()
    base = logits(model)
    add_adapter(model, LoraConfig(r=2, lora_alpha=4, **kwargs), name="trained")
    _perturb(model)
    adapted = logits(model)
    assert max_diff(adapted, base) > 1e-3
    save_adapter(model, tmp_path, name="trained")
    assert {p.name for p in tmp_path.iterdir()} == ADAPTER_FILES  # no temp files left behind
    umask = os.umask(0)
    os.umask(umask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {0o666 & ~umask}

    fresh = build()
    assert load_adapter(fresh, tmp_path, name="other") == "other"
    assert active_adapters(fresh) == ["other"]
    assert max_diff(logits(fresh), adapted) <= 1e-6
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if "lora_" in n)

    again = build()
    load_adapter(again, tmp_path, trainable=True)
    assert active_adapters(again) == ["default"]
    assert max_diff(logits(again), adapted) <= 1e-6
    assert all(p.requires_grad for n, p in again.named_parameters() if ".lora_" in n)


def test_loaded_adapter_joins_inactive_next_to_existing_one(tmp_path):
    model = tm.llama()
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), name="a")
    out_a = logits(model)
    save_adapter(model, tmp_path, name="a")
    other = tm.llama()
    torch.manual_seed(9)
    add_adapter(other, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False), name="b")
    out_b = logits(other)
    load_adapter(other, tmp_path, name="a")
    assert active_adapters(other) == ["b"]
    assert max_diff(logits(other), out_b) <= 1e-6
    set_active_adapters(other, ["a"])
    assert max_diff(logits(other), out_a) <= 1e-6


# --- the file layout is PEFT's -------------------------------------------------------------------------------
LAYOUTS = {
    "gpt2": (tm.gpt2, dict(target_modules=["c_attn", "c_proj", "wte"]), None),
    "llama-all-linear": (tm.llama, dict(target_modules="all-linear"), "CAUSAL_LM"),
    "llama-dora": (tm.llama, dict(target_modules=["q_proj", "down_proj"], use_dora=True), None),
    "bert-seq-cls": (tm.bert_classifier, dict(target_modules=["query", "value"], modules_to_save=["classifier"],
                                              use_dora=True), "SEQ_CLS"),
    "t5-bias": (tm.t5, dict(target_modules=["q", "v", "shared"], bias="all"), None),
}


@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_file_keys_and_config_match_peft(case, tmp_path):
    build, kwargs, task_type = LAYOUTS[case]
    ours = build()
    add_adapter(ours, LoraConfig(r=2, task_type=task_type, **kwargs))
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.get_peft_model(build(), peft.LoraConfig(r=2, task_type=task_type, **kwargs))
    theirs.save_pretrained(tmp_path / "peft")
    assert _keys(tmp_path / "ours") == _keys(tmp_path / "peft")
    assert any("lora_A.weight" in k or "lora_embedding_A" in k for k in _keys(tmp_path / "ours"))
    ours_config = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    peft_config = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    assert sorted(ours_config["target_modules"]) == sorted(peft_config["target_modules"])
    for key in ("r", "lora_alpha", "use_dora", "bias", "fan_in_fan_out", "peft_type", "task_type"):
        assert ours_config[key] == peft_config[key], key


def test_all_linear_is_written_as_names():
    model = tm.gpt2()
    add_adapter(model, LoraConfig(r=2, target_modules="all-linear"))
    names = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert model.lora_configs["default"].target_modules == [f"transformer.h.{i}.{n}" for i in (0, 1) for n in names]


def test_all_linear_for_sequence_classification_leaves_the_head_out():
    """As PEFT: with task_type SEQ_CLS the head is not a LoRA target (it is a saved module, if anything)."""
    model = tm.bert_classifier()
    add_adapter(model, LoraConfig(r=2, target_modules="all-linear", task_type="SEQ_CLS"))
    assert "classifier" not in model.lora_configs["default"].target_modules
    assert isinstance(model.classifier, torch.nn.Linear)
    theirs = peft.get_peft_model(tm.bert_classifier(), peft.LoraConfig(r=2, target_modules="all-linear",
                                                                       task_type="SEQ_CLS"))
    assert sorted(theirs.peft_config["default"].target_modules) == model.lora_configs["default"].target_modules


def test_save_failure_leaves_no_files(tmp_path, monkeypatch):
    import loratune.core.peft_format as io

    model = tm.llama()
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]))

    def broken(tensors, path, metadata=None):
        save_file(tensors, path, metadata)
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", broken)
    with pytest.raises(OSError) as error:
        save_adapter(model, tmp_path / "out")
    assert str(error.value) == f"cannot write {tmp_path / 'out' / 'adapter_model.safetensors'}: disk full"
    assert not (tmp_path / "out").exists()  # no files, and no empty folder either


def test_save_replaces_previous_files_atomically(tmp_path):
    model = tm.llama()
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    save_adapter(model, tmp_path)
    _perturb(model)
    save_adapter(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == ADAPTER_FILES
    fresh = tm.llama()
    load_adapter(fresh, tmp_path)
    assert max_diff(logits(fresh), logits(model)) <= 1e-6


# --- refusals ------------------------------------------------------------------------------------------------
@pytest.fixture
def saved_llama(tmp_path):
    model = tm.llama()
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "up_proj"], init_lora_weights=False))
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter", logits(model)


def _refused(model, directory, error, fragment, **kwargs):
    before = snapshot(model)
    active = active_adapters(model)
    with pytest.raises(error, match=fragment) as info:
        load_adapter(model, directory, **kwargs)
    assert "\n" not in str(info.value)
    assert_unchanged(model, before)
    assert active_adapters(model) == active
    return info.value


def test_shape_mismatch_names_first_key_and_both_shapes(saved_llama):
    directory, _ = saved_llama
    model = tm.llama(intermediate_size=24)
    _refused(model, directory, AdapterFileError,
             r"'base_model\.model\.model\.layers\.0\.mlp\.up_proj\.lora_B\.weight' has shape \(32, 2\) in the file "
             r"but \(24, 2\) in the model")


def test_shape_mismatch_leaves_existing_adapter_alone(saved_llama):
    directory, _ = saved_llama
    model = tm.llama(intermediate_size=24)
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "k_proj"], init_lora_weights=False), name="mine")
    _refused(model, directory, AdapterFileError, "has shape")


def test_missing_and_extra_keys(saved_llama, tmp_path):
    directory, _ = saved_llama
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / CONFIG_NAME).write_text((directory / CONFIG_NAME).read_text())
    save_file({k: v for k, v in tensors.items() if k != key}, str(missing / WEIGHTS_NAME))
    _refused(tm.llama(), missing, AdapterFileError, f"lacks '{key}'")
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / CONFIG_NAME).write_text((directory / CONFIG_NAME).read_text())
    save_file({**tensors, "base_model.model.model.norm.weight": torch.ones(16)}, str(extra / WEIGHTS_NAME))
    _refused(tm.llama(), extra, AdapterFileError, "'base_model.model.model.norm.weight', which matches nothing")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(saved_llama, tmp_path, value):
    """Issue 27: NaN weights merged, exported and served; refused at load, also when resuming into a model."""
    from loratune.core.peft_format import load_adapter_weights_into

    directory, _ = saved_llama
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    tensors[key][3, 1] = value
    poisoned = tmp_path / "poisoned"
    poisoned.mkdir()
    (poisoned / CONFIG_NAME).write_text((directory / CONFIG_NAME).read_text())
    save_file(tensors, str(poisoned / WEIGHTS_NAME))
    _refused(tm.llama(), poisoned, AdapterFileError, rf"'{key}' holds non-finite values \(NaN or inf\)")
    model = tm.llama()
    load_adapter(model, directory)
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=key):
        load_adapter_weights_into(model, poisoned)
    assert_unchanged(model, before)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "header"])
def test_corrupt_safetensors_is_refused(saved_llama, damage):
    directory, _ = saved_llama
    path = directory / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes({"garbage": b"\x00\x01not a safetensors file" * 10, "truncated": data[: len(data) - 40],
                      "empty": b"", "header": data[:9] + b"\xff" + data[10:]}[damage])
    _refused(tm.llama(), directory, AdapterFileError, "corrupt or truncated safetensors file")


def test_pickle_file_needs_allow_pickle(saved_llama):
    directory, adapted = saved_llama
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    (directory / WEIGHTS_NAME).unlink()
    torch.save(tensors, directory / "adapter_model.bin")
    _refused(tm.llama(), directory, AdapterFileError, r"refusing a pickle adapter file.*allow_pickle=True")
    model = tm.llama()
    load_adapter(model, directory, allow_pickle=True)
    assert max_diff(logits(model), adapted) <= 1e-6


def test_name_taken(saved_llama):
    directory, _ = saved_llama
    model = tm.llama()
    add_adapter(model, LoraConfig(r=2, target_modules=["v_proj"]))
    _refused(model, directory, AdapterNameError, "adapter name 'default' is already taken")


def test_adapter_for_another_model_is_refused(saved_llama):
    directory, _ = saved_llama
    _refused(tm.gpt2(), directory, AdapterFileError, r"does not fit this model: .*matched no module")


def test_bad_config_files(saved_llama):
    directory, _ = saved_llama
    path = directory / CONFIG_NAME
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "lora_alhpa": 3}))
    _refused(tm.llama(), directory, AdapterFileError, r"unknown key 'lora_alhpa' \(did you mean 'lora_alpha'\?\)")
    path.write_text(json.dumps({**data, "r": 0}))
    _refused(tm.llama(), directory, AdapterFileError, "r must be a positive integer, got 0")
    path.write_text("{not json")
    _refused(tm.llama(), directory, AdapterFileError, "not valid JSON")
    path.unlink()
    _refused(tm.llama(), directory, AdapterFileError, "no adapter config here")


def test_missing_weights(saved_llama):
    directory, _ = saved_llama
    (directory / WEIGHTS_NAME).unlink()
    _refused(tm.llama(), directory, AdapterFileError, "no adapter weights here")
