"""Training methods of the one trainer: `lora` (an adapter on a frozen base, the default), `full` (every
weight trains: the baseline every LoRA claim is measured against) and `head` (only a classifier's output
head trains: a linear probe, `loratune compare`'s "base" for classifiers).

The method decides three things and nothing else: which parameters train (`load_for_method`), what a
checkpoint holds (`save_trainable` / `load_trainable`: the adapter files, or the trainable parameters in
one safetensors file) and what the run leaves (`save_trained`: the adapter folder, or a transformers model
folder with its tokenizer). Data, evaluation, the loop, the report and resuming are the same for all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from loratune.core.adapters import adapter_configs, output_head_paths
from loratune.core.atomic_write import atomic_folder, atomic_path
from loratune.core.errors import LoratuneError
from loratune.core.peft_format import load_adapter_weights_into, save_adapter
from loratune.pretrained import load_adapted_model, load_model
from loratune.tasks import TASK_TYPES

Method = Literal["lora", "full", "head"]
TRAINABLE_NAME = "trainable.safetensors"  # a checkpoint's weights when the model has no adapter


def trained_folder(out: Path, method: str) -> Path:
    """Where a finished run's result is: `adapter/` for LoRA, `model/` (a transformers folder) otherwise."""
    return out / ("adapter" if method == "lora" else "model")


def load_for_method(config: Any, adapter: str, label_names: list[str] | None, dtype: torch.dtype,
                    saved: Path | None = None, quantize: str = "none",
                    shard: tuple[int, int] | None = None,
                    compute_dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """`(model, tokenizer)` ready to train as `config.method` says; `saved` is a finished run's result
    (`trained_folder`) to load instead of a fresh start; `shard=(rank, world)`: an FSDP2 rank's share of a
    quantized base (`pretrained.load_adapted_model`); `compute_dtype`: the products' dtype, for a base kept in
    16 bits (`pretrained.load_model`). Full fine-tuning and the probe keep float32 weights: AdamW updates of
    bf16 weights lose most of their bits."""
    spec = config.model
    if config.method == "lora":
        return load_adapted_model(
            spec.name, spec.task, config.lora, adapter, adapter_dir=saved, quantize=quantize,
            double_quant=spec.double_quant, loftq_iterations=spec.loftq_iterations, label_names=label_names,
            dtype=dtype, trust_remote_code=spec.trust_remote_code, shard=shard, compute_dtype=compute_dtype)
    source = str(saved) if saved is not None else spec.name
    model, tokenizer = load_model(source, spec.task, label_names=label_names, dtype=torch.float32,
                                  trust_remote_code=spec.trust_remote_code)
    mark_method_trainable(model, config.method, spec.task)
    return model, tokenizer


def mark_method_trainable(model: nn.Module, method: str, task: str) -> None:
    """Every parameter trains (`full`), or only the output head (`head`)."""
    if method == "full":
        model.requires_grad_(True)
        return
    heads = output_head_paths(model, TASK_TYPES[task])
    model.requires_grad_(False)
    for path, module in model.named_modules():
        if path in heads:
            module.requires_grad_(True)


def save_trained(model: nn.Module, tokenizer: Any, out: Path, method: str, adapter: str) -> Path:
    """The finished run's result (atomic): the adapter files, or a transformers folder with the tokenizer."""
    folder = trained_folder(out, method)
    if method == "lora":
        return save_adapter(model, folder, adapter)
    with atomic_folder(folder, replace=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return folder


def save_trainable(model: nn.Module, folder: Path, adapter: str) -> None:
    """A checkpoint's weights: the adapter's files, or (no adapter) every trainable parameter by name."""
    if adapter_configs(model):
        save_adapter(model, folder, adapter)
        return
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters() if p.requires_grad}
    with atomic_path(folder / TRAINABLE_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def load_trainable(model: nn.Module, folder: Path, adapter: str) -> None:
    """Put a checkpoint's weights (`save_trainable`) back into `model`; a missing or mismatched tensor is a
    `LoratuneError` naming the file, and then nothing has been copied."""
    if adapter_configs(model):
        load_adapter_weights_into(model, folder, adapter)
        return
    path = folder / TRAINABLE_NAME
    try:
        saved = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise LoratuneError(f"{path}: unreadable ({exc})") from None
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if saved.keys() != params.keys() or any(saved[k].shape != p.shape for k, p in params.items()):
        raise LoratuneError(f"{path}: its tensors do not match the model's trainable parameters")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])


def with_method(config: Any, method: str, **train: Any) -> Any:
    """A copy of `config` for another method (and train keys), validated again."""
    data = config.model_dump()
    data["method"] = method
    data["train"].update(train)
    return type(config).model_validate(data)

