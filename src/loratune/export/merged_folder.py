"""The merged model as a transformers folder: what `loratune merge` and `export --format safetensors` write."""

from __future__ import annotations

import os
from pathlib import Path

import torch

import loratune as lt
from loratune.core.atomic_write import atomic_folder, remove_leftovers
from loratune.core.errors import ConfigError, LoratuneError
from loratune.core.lora_config import LoraConfig
from loratune.core.peft_format import KEY_PREFIX, read_adapter_config, read_adapter_weights
from loratune.export.out_path import check_folder_out
from loratune.pretrained import check_adapter_task, load_model
from loratune.tasks import TASK_TYPES

FOLDER_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def check_empty_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise LoratuneError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        raise LoratuneError(f"{out}: output folder exists and is not empty")


def write_merged_folder(model_name: str, adapter_dir: str | os.PathLike, out: str | os.PathLike,
                        task: str | None = None, dtype: str = "f32") -> Path:
    """Load `model_name`, merge the adapter in, save weights and tokenizer; the folder appears whole or not at all.

    The model is loaded for `task`, by default the adapter's own `task_type` (a SEQ_CLS adapter gets its base
    with a classification head of the adapter's label count)."""
    out = Path(out)
    if dtype not in FOLDER_DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: a safetensors folder is written as one of {', '.join(FOLDER_DTYPES)}")
    check_folder_out(out, adapter_dir, model_name)
    check_empty_folder(out)
    config = read_adapter_config(adapter_dir)  # fail before the model loads
    if task is None:
        task = {kind: name for name, kind in TASK_TYPES.items()}.get(config.task_type or "", "causal-lm")
    else:
        check_adapter_task(adapter_dir, task)
    labels = head_labels(adapter_dir, config, model_name) if task == "classification" else None
    model, tokenizer = load_model(model_name, task, num_labels=labels)
    lt.load_adapter(model, adapter_dir)
    merged = lt.unload(model, merge=True).to(FOLDER_DTYPES[dtype])
    remove_leftovers(out.parent, (out.name,))  # of an earlier write to this folder that was killed
    with atomic_folder(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def head_labels(adapter_dir: str | os.PathLike, config: LoraConfig, model_name: str) -> int | None:
    """The label count of the classification head the adapter saves (`modules_to_save`), else the base's own."""
    heads = config.modules_to_save or []
    for key, tensor in read_adapter_weights(adapter_dir).items():
        path = "." + key.removeprefix(KEY_PREFIX)
        if any(path.endswith((f".{head}.weight", f".{head}.out_proj.weight")) for head in heads):
            return int(tensor.shape[0])
    from transformers import AutoConfig

    try:
        return int(AutoConfig.from_pretrained(model_name).num_labels)
    except (OSError, ValueError):
        return None  # load_model then says what is missing
