"""LoraConfig: validation, scaling, per-module patterns and the adapter_config.json mapping."""

from __future__ import annotations

import json
import math

import peft
import pytest

from loratune import ConfigError, LoraConfig
from loratune.core.lora_config import pattern_matches


def test_defaults_and_scaling():
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q"])
    assert config.scaling_for("model.layers.0.q") == 2.0


def test_rslora_scaling_is_alpha_over_sqrt_r():
    config = LoraConfig(r=16, lora_alpha=8, target_modules=["q"], use_rslora=True)
    assert config.scaling_for("q") == pytest.approx(8 / math.sqrt(16))
    assert config.scaling_for("q") != 8 / 16


def test_rank_and_alpha_patterns_are_per_module():
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                        rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 8}, alpha_pattern={"q_proj": 16})
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 4
    assert config.rank_for("model.layers.1.self_attn.q_proj") == 8
    assert config.rank_for("model.layers.0.self_attn.v_proj") == 2
    assert config.alpha_for("model.layers.0.self_attn.q_proj") == 16
    assert config.alpha_for("model.layers.0.self_attn.v_proj") == 4
    assert config.scaling_for("model.layers.1.self_attn.q_proj") == 16 / 8


def test_pattern_matches_whole_name_or_dot_suffix():
    assert pattern_matches("q_proj", "model.layers.0.q_proj")
    assert pattern_matches("q_proj", "q_proj")
    assert not pattern_matches("proj", "model.layers.0.q_proj")
    assert not pattern_matches("q_proj", "model.layers.0.q_proj.base")


@pytest.mark.parametrize("kwargs, fragment", [
    ({"r": 0}, "r must be a positive integer"),
    ({"r": -2}, "r must be a positive integer"),
    ({"r": 2.5}, "r must be a positive integer"),
    ({"r": True}, "r must be a positive integer"),
    ({"rank_pattern": {"q": 0}}, "rank_pattern"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"bias": "some"}, "bias"),
    ({"init_lora_weights": "olora"}, "init_lora_weights"),
    ({"target_modules": "q_proj("}, "invalid regular expression"),
    ({"target_modules": None}, "target_modules is required"),
])
def test_invalid_values_raise_config_error(kwargs, fragment):
    kwargs = {"target_modules": ["q"], **kwargs}
    with pytest.raises(ConfigError, match=fragment) as info:
        LoraConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_from_dict_rejects_unknown_keys_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown key 'lora_alhpa' \(did you mean 'lora_alpha'\?\)") as info:
        LoraConfig.from_dict({"r": 4, "target_modules": ["q"], "lora_alhpa": 16})
    assert "\n" not in str(info.value)


def test_from_dict_rejects_unsupported_peft_feature():
    with pytest.raises(ConfigError, match="lora_bias=True is a PEFT feature"):
        LoraConfig.from_dict({"r": 4, "target_modules": ["q"], "lora_bias": True})


def test_round_trip_through_dict():
    config = LoraConfig(r=4, lora_alpha=32, target_modules=["q", "v"], use_dora=True, rank_pattern={"v": 2},
                        modules_to_save=("head",), layers_to_transform=[1], bias="lora_only")
    data = config.to_dict()
    assert data["peft_type"] == "LORA"
    assert LoraConfig.from_dict(data) == config


def test_peft_written_config_is_accepted(tmp_path):
    """Every key PEFT's own LoraConfig writes is readable, and the fields survive."""
    peft_config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj"], use_rslora=True,
                                  rank_pattern={"q_proj": 2}, task_type="CAUSAL_LM")
    peft_config.save_pretrained(tmp_path)

    data = json.loads((tmp_path / "adapter_config.json").read_text())
    config = LoraConfig.from_dict(data)
    assert (config.r, config.lora_alpha, config.use_rslora, config.rank_pattern) == (4, 12, True, {"q_proj": 2})
    assert config.target_modules == ["q_proj"]
    assert config.task_type == "CAUSAL_LM"


def test_loratune_config_is_accepted_by_peft(tmp_path):
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"], use_dora=True, lora_dropout=0.1)

    (tmp_path / "adapter_config.json").write_text(json.dumps(config.to_dict()))
    loaded = peft.LoraConfig.from_pretrained(tmp_path)
    assert (loaded.r, loaded.lora_alpha, loaded.use_dora, loaded.lora_dropout) == (4, 12, True, 0.1)
    assert set(loaded.target_modules) == {"q_proj", "v_proj"}


@pytest.mark.parametrize("field,value", [
    ("lora_alpha", "abc"), ("lora_dropout", "0.1"), ("target_modules", 5), ("layers_to_transform", "0"),
    ("modules_to_save", "classifier"), ("use_dora", "yes"), ("alpha_pattern", {"q": "x"}),
])
def test_wrong_types_are_config_errors_naming_the_field(field, value):
    kwargs = {"target_modules": ["q"], field: value}
    with pytest.raises(ConfigError, match=f"LoraConfig.{field}"):
        LoraConfig(**kwargs)
