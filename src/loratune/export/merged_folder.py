"""The merged model as a transformers folder: what `loratune merge` and `export --format safetensors` write."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

import loratune as lt
from loratune.errors import ConfigError, LoratuneError
from loratune.io import read_adapter_config
from loratune.models import load_model

FOLDER_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def check_empty_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise LoratuneError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        raise LoratuneError(f"{out}: output folder exists and is not empty")


def write_merged_folder(model_name: str, adapter_dir: str | os.PathLike, out: str | os.PathLike,
                        task: str = "causal-lm", dtype: str = "f32") -> Path:
    """Load `model_name`, merge the adapter in, save weights and tokenizer; the folder appears whole or not at all."""
    out = Path(out)
    if dtype not in FOLDER_DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: a safetensors folder is written as one of {', '.join(FOLDER_DTYPES)}")
    check_empty_folder(out)
    read_adapter_config(adapter_dir)  # fail before the model loads
    model, tokenizer = load_model(model_name, task)
    lt.load_adapter(model, adapter_dir)
    merged = lt.unload(model, merge=True).to(FOLDER_DTYPES[dtype])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
