"""loratune: LoRA fine-tuning with a small core and PEFT-compatible adapter files."""

from loratune.core.adapters import (
    ParamCount,
    active_adapters,
    add_adapter,
    delete_adapter,
    disable_adapters,
    merge,
    set_active_adapters,
    trainable_parameters,
    unload,
    unmerge,
)
from loratune.core.combining import add_weighted_adapter, mixed_adapter_batch
from loratune.core.errors import AdapterFileError, AdapterNameError, ConfigError, LoratuneError, MergeError, TargetError
from loratune.core.lora_config import LoraConfig
from loratune.core.peft_format import load_adapter, save_adapter
from loratune.errors import DataError, ModelLoadError, QuantizationError

__all__ = [
    "AdapterFileError", "AdapterNameError", "ConfigError", "DataError", "LoraConfig", "LoratuneError",
    "MergeError", "ModelLoadError", "ParamCount", "QuantizationError", "TargetError", "active_adapters", "add_adapter",
    "add_weighted_adapter", "delete_adapter", "disable_adapters", "load_adapter", "merge", "mixed_adapter_batch",
    "save_adapter", "set_active_adapters", "trainable_parameters", "unload", "unmerge",
]
