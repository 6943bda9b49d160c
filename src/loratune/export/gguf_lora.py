"""A loratune/PEFT LoRA adapter as a GGUF LoRA file, in the layout llama.cpp's own converter writes.

`general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and per adapted weight two tensors
named after llama.cpp's tensor name: `<name>.lora_a` (PEFT's lora_A, shape (r, in)) and `<name>.lora_b`
(PEFT's lora_B, shape (out, r)), neither transposed. llama.cpp scales each pair by alpha / r, with r read
from that pair's shape; a module whose own scale differs (rsLoRA, alpha_pattern) has the ratio folded into
its lora_b, so every module keeps exactly the scale it was trained with.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch

from loratune.core.errors import AdapterFileError, ConfigError
from loratune.core.lora_config import LoraConfig
from loratune.export.gguf_model import write_tensors_and_close
from loratune.export.layout import GGUFLayout

#: --dtype values a GGUF LoRA takes (llama.cpp reads these for adapters)
LORA_DTYPES = ("f32", "f16", "q8_0")
_A, _B = ".lora_A.weight", ".lora_B.weight"


def lora_pairs(config: LoraConfig, weights: dict[str, torch.Tensor], adapter_dir: str | os.PathLike,
               prefix: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path -> (lora_A, lora_B); a one-line error for what a GGUF LoRA cannot carry."""
    where = Path(adapter_dir) / "adapter_config.json"
    if config.use_dora:
        raise AdapterFileError(f"{where}: use_dora=true: a GGUF LoRA cannot carry DoRA's magnitude vectors "
                               "(export --format gguf merges them instead)")
    if config.modules_to_save:
        raise AdapterFileError(f"{where}: modules_to_save={config.modules_to_save}: a GGUF LoRA cannot carry whole "
                               "trained modules (export --format gguf merges them instead)")
    if config.bias != "none":
        raise AdapterFileError(f"{where}: bias={config.bias!r}: a GGUF LoRA cannot carry trained biases "
                               "(export --format gguf merges them instead)")
    pairs: dict[str, list[torch.Tensor | None]] = {}
    for key, tensor in weights.items():
        if "lora_embedding_" in key:
            raise AdapterFileError(f"{adapter_dir}: {key!r} is an embedding adapter, which a GGUF LoRA cannot "
                                   "carry (export --format gguf merges it instead)")
        if not key.startswith(prefix) or not key.endswith((_A, _B)) or tensor.ndim != 2:
            raise AdapterFileError(f"{adapter_dir}: {key!r} is not a linear layer's lora_A/lora_B, which is all a "
                                   "GGUF LoRA carries")
        path, index = (key[len(prefix):-len(_A)], 0) if key.endswith(_A) else (key[len(prefix):-len(_B)], 1)
        pairs.setdefault(path, [None, None])[index] = tensor
    for path, (a, b) in pairs.items():
        if a is None or b is None:
            raise AdapterFileError(f"{adapter_dir}: {path!r} has only one of lora_A / lora_B")
    return {path: (a, b) for path, (a, b) in pairs.items()}


def llama_cpp_factor(config: LoraConfig, path: str, rank: int) -> float:
    """What lora_b is multiplied by so that llama.cpp's alpha / rank equals this module's own scale."""
    runtime_scale = config.lora_alpha / rank if config.lora_alpha else 1.0
    return config.scaling_for(path) / runtime_scale


def lora_tensors(config: LoraConfig, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], layout: GGUFLayout,
                 tied_output: bool) -> dict[str, np.ndarray]:
    """GGUF name -> array, for every `.lora_a` / `.lora_b`."""
    tensors: dict[str, np.ndarray] = {}
    for path, (a, b) in sorted(pairs.items()):
        name = layout.gguf_name(path + ".weight")
        if name is None:
            raise ConfigError(f"adapter target {path!r} has no llama.cpp {layout.arch_name} tensor to adapt")
        if name == "output.weight" and tied_output:
            raise ConfigError(f"adapter target {path!r}: the output head shares token_embd's weight in GGUF, "
                              "so a LoRA on it cannot be carried (export --format gguf merges it instead)")
        b = b.float() * llama_cpp_factor(config, path, a.shape[0])
        tensors[name + ".lora_a"] = a.float().numpy()
        tensors[name + ".lora_b"] = layout.reorder_rows(name, b.numpy())
    return tensors


def write_lora_gguf(config: LoraConfig, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], layout: GGUFLayout,
                    path: Path, dtype: str, tied_output: bool = False, name: str | None = None) -> None:
    if dtype not in LORA_DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: a GGUF LoRA is written as one of {', '.join(LORA_DTYPES)}")
    tensors = lora_tensors(config, pairs, layout, tied_output)
    writer = gguf.GGUFWriter(path=None, arch=layout.arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config.lora_alpha))
    if name:
        writer.add_name(name)
    write_tensors_and_close(writer, path, tensors, dtype)
