"""loratune: LoRA fine-tuning with a small core and PEFT-compatible adapter files."""

from .config import LoraConfig
from .errors import (
    AdapterFileError,
    AdapterNameError,
    ConfigError,
    DataError,
    LoratuneError,
    MergeError,
    ModelLoadError,
    QuantizationError,
    TargetError,
)
from .io import load_adapter, save_adapter
from .model import (
    ParamCount,
    active_adapters,
    add_adapter,
    add_weighted_adapter,
    delete_adapter,
    disable_adapters,
    merge,
    mixed_adapter_batch,
    set_active_adapters,
    trainable_parameters,
    unload,
    unmerge,
)

__all__ = [
    "AdapterFileError", "AdapterNameError", "ConfigError", "DataError", "LoraConfig", "LoratuneError",
    "MergeError", "ModelLoadError", "ParamCount", "QuantizationError", "TargetError", "active_adapters", "add_adapter",
    "add_weighted_adapter", "delete_adapter", "disable_adapters", "load_adapter", "merge", "mixed_adapter_batch",
    "save_adapter", "set_active_adapters", "trainable_parameters", "unload", "unmerge",
]
