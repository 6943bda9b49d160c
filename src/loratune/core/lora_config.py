"""`LoraConfig`: what to adapt and how, with PEFT's field names so `adapter_config.json` maps one to one."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from loratune.core.errors import ConfigError

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian", "pissa")

# Keys PEFT writes into adapter_config.json for LoRA that loratune does not model. Reading a file that
# has them at their neutral value is fine; any other value names a feature loratune cannot reproduce.
_PEFT_NEUTRAL_KEYS: dict[str, tuple[Any, ...]] = {
    "peft_type": ("LORA",),
    "peft_version": (),  # any value
    "auto_mapping": (),
    "revision": (),
    "inference_mode": (),
    "fan_in_fan_out": (),  # loratune reads the layout from the layer type (transformers' Conv1D)
    "megatron_core": (),
    "qalora_group_size": (),
    "loftq_config": ({}, None),
    "alora_invocation_tokens": (None,),
    "arrow_config": (None,),
    "corda_config": (None,),
    "eva_config": (None,),
    "kasa_config": (None,),
    "lora_ga_config": (None,),
    "monteclora_config": (None,),
    "megatron_config": (None,),
    "velora_config": (None,),
    "layer_replication": (None,),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "use_bdlora": (None, False),
    "ensure_weight_tying": (False,),
    "lora_bias": (False,),
    "use_qalora": (False,),
}


@dataclass
class LoraConfig:
    """One adapter's settings. Field names and meanings are PEFT's (see README for each)."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if self.target_modules is None:
            raise ConfigError("LoraConfig.target_modules is required (a list of names, a regex or 'all-linear')")
        _check_types(self)
        _check_rank("r", self.r)
        for pattern, rank in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{pattern!r}]", rank)
        for name, alpha in [("lora_alpha", self.lora_alpha),
                            *((f"alpha_pattern[{p!r}]", a) for p, a in self.alpha_pattern.items())]:
            if not math.isfinite(alpha) or alpha == 0:  # alpha 0 scales every update to nothing
                raise ConfigError(f"LoraConfig.{name} must be a finite non-zero number, got {alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"LoraConfig.bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.init_lora_weights not in INIT_MODES:
            raise ConfigError(
                f"LoraConfig.init_lora_weights must be one of {INIT_MODES}, got {self.init_lora_weights!r}"
            )
        for name, value in (("target_modules", self.target_modules), ("exclude_modules", self.exclude_modules)):
            if isinstance(value, str) and value != ALL_LINEAR:
                _check_regex(name, value)
        for name, patterns in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for pattern in patterns:
                _check_regex(name, pattern)

    def rank_for(self, path: str) -> int:
        return int(_pattern_value(self.rank_pattern, path, self.r))

    def alpha_for(self, path: str) -> float:
        return float(_pattern_value(self.alpha_pattern, path, self.lora_alpha))

    def scaling_for(self, path: str) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA (which keeps updates stable as r grows)."""
        rank, alpha = self.rank_for(path), self.alpha_for(path)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def to_dict(self) -> dict[str, Any]:
        """The adapter_config.json contents, readable by PEFT."""
        data = dataclasses.asdict(self)
        data["peft_type"] = "LORA"
        data["fan_in_fan_out"] = False
        data["inference_mode"] = True
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "LoraConfig") -> LoraConfig:
        """Build from a dict (e.g. adapter_config.json written by loratune or PEFT).

        Unknown keys are an error, so a typo never silently changes training; PEFT's extra keys are
        accepted at their neutral values.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in _PEFT_NEUTRAL_KEYS:
                allowed = _PEFT_NEUTRAL_KEYS[key]
                if allowed and value not in allowed:
                    raise ConfigError(f"{source}: {key}={value!r} is a PEFT feature loratune does not support")
            else:
                close = _closest(key, known)
                raise ConfigError(f"{source}: unknown key {key!r}" + (f" (did you mean {close!r}?)" if close else ""))
        return cls(**kwargs)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_names(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _check_types(config: LoraConfig) -> None:
    """Wrong types fail here with the field's name, not later inside a layer."""
    checks = [
        ("lora_alpha", _is_number(config.lora_alpha), "a number"),
        ("lora_dropout", _is_number(config.lora_dropout), "a number"),
        ("target_modules", _is_names(config.target_modules), "a list of names or a regex string"),
        ("exclude_modules", config.exclude_modules is None or _is_names(config.exclude_modules),
         "a list of names or a regex string"),
        ("layers_to_transform", config.layers_to_transform is None
         or (isinstance(config.layers_to_transform, int) and not isinstance(config.layers_to_transform, bool))
         or (isinstance(config.layers_to_transform, list)
             and all(isinstance(i, int) and not isinstance(i, bool) for i in config.layers_to_transform)),
         "an integer or a list of integers"),
        ("modules_to_save", config.modules_to_save is None
         or (isinstance(config.modules_to_save, list) and all(isinstance(m, str) for m in config.modules_to_save)),
         "a list of names"),
        ("rank_pattern", isinstance(config.rank_pattern, dict), "a mapping of pattern to rank"),
        ("alpha_pattern", isinstance(config.alpha_pattern, dict)
         and all(_is_number(v) for v in config.alpha_pattern.values()), "a mapping of pattern to number"),
        ("use_rslora", isinstance(config.use_rslora, bool), "true or false"),
        ("use_dora", isinstance(config.use_dora, bool), "true or false"),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise ConfigError(f"LoraConfig.{name} must be {expected}, got {getattr(config, name)!r}")


def _check_rank(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"LoraConfig.{name} must be a positive integer, got {value!r}")


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"LoraConfig.{name}: invalid regular expression {pattern!r}: {exc}") from None


def pattern_matches(pattern: str, path: str) -> bool:
    """PEFT's rule for rank/alpha patterns and name lists: the pattern matches the path or a `.`-suffix of it."""
    return re.fullmatch(rf"(?:.*\.)?(?:{pattern})", path) is not None


def _pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    for pattern, value in patterns.items():
        if pattern_matches(pattern, path):
            return value
    return default


def _closest(word: str, candidates: set[str]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(word, sorted(candidates), n=1)
    return matches[0] if matches else None
