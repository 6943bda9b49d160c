"""loratune: LoRA fine-tuning with a small core and PEFT-compatible adapter files.

The public names load on first use (PEP 562): `import loratune.cli` imports no torch, so the `loratune`
program can restart itself under its malloc (`allocator`) before paying for torch's start-up once.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Where each public name lives.
_PUBLIC = {
    "loratune.core.adapters": ("ParamCount", "active_adapters", "add_adapter", "delete_adapter", "disable_adapters",
                               "merge", "set_active_adapters", "trainable_parameters", "unload", "unmerge"),
    "loratune.core.combining": ("add_weighted_adapter", "mixed_adapter_batch"),
    "loratune.core.errors": ("AdapterFileError", "AdapterNameError", "ConfigError", "LoratuneError", "MergeError",
                             "TargetError"),
    "loratune.core.lora_config": ("LoraConfig",),
    "loratune.core.peft_format": ("load_adapter", "save_adapter"),
    "loratune.errors": ("DataError", "ModelLoadError", "QuantizationError"),
}
_HOME = {name: module for module, names in _PUBLIC.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'loratune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value  # found once, then an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

