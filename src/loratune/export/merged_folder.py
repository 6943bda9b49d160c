"""The merged model as a transformers folder: what `loratune merge` and `export --format safetensors` write."""

from __future__ import annotations

import os
from pathlib import Path

import torch

import loratune as lt
from loratune.core.atomic_write import atomic_folder, remove_leftovers
from loratune.core.errors import ConfigError, LoratuneError
from loratune.export.out_path import check_folder_out
from loratune.pretrained import adapter_task, load_model

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
    task, labels = adapter_task(adapter_dir, model_name, task)  # reads the config: fails before the model loads
    model, tokenizer = load_model(model_name, task, num_labels=labels)
    lt.load_adapter(model, adapter_dir)
    merged = lt.unload(model, merge=True).to(FOLDER_DTYPES[dtype])
    remove_leftovers(out.parent, (out.name,))  # of an earlier write to this folder that was killed
    with atomic_folder(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out

