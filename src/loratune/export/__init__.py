"""Take a trained adapter to the runtimes people deploy on.

`export(adapter_dir, model, format, out, dtype)` writes one of:
- "gguf-lora": the adapter as a GGUF LoRA (llama.cpp `--lora`, llama-cpp-python `lora_path`, Ollama `ADAPTER`);
- "gguf": the merged model as one GGUF file with tokenizer and chat template (Llama family);
- "safetensors": the merged model as a transformers folder (what `loratune merge` writes).
A GGUF export gets an Ollama Modelfile beside it (`<out stem>.Modelfile`). Everything a format cannot carry is
refused with one line before anything is written; files appear under their names only when complete, never
over the adapter or model being read, and over an existing file of another format only with `force`.
"""

from __future__ import annotations

import os
from pathlib import Path

import loratune as lt
from loratune.core.atomic_write import atomic_path, remove_leftovers
from loratune.core.errors import ConfigError, LoratuneError
from loratune.core.peft_format import KEY_PREFIX, read_adapter_config, read_adapter_weights
from loratune.export.gguf_lora import LORA_DTYPES, lora_pairs, write_lora_gguf
from loratune.export.gguf_model import DTYPES, write_model_gguf
from loratune.export.layout import layout_for
from loratune.export.merged_folder import FOLDER_DTYPES, write_merged_folder
from loratune.export.modelfile import modelfile_text
from loratune.export.out_path import check_out
from loratune.pretrained import builtin_models, builtin_path, load_model

FORMATS = ("gguf-lora", "gguf", "safetensors")
DEFAULT_DTYPES = {"gguf-lora": "f32", "gguf": "f16", "safetensors": "f32"}
_FORMAT_DTYPES = {"gguf-lora": LORA_DTYPES, "gguf": tuple(DTYPES), "safetensors": tuple(FOLDER_DTYPES)}

__all__ = ["DEFAULT_DTYPES", "FORMATS", "export", "gguf_source", "modelfile_path"]


def export(adapter_dir: str | os.PathLike, model: str, format: str, out: str | os.PathLike,
           dtype: str | None = None, force: bool = False) -> list[Path]:
    """Write `format` for the adapter in `adapter_dir` on base `model`; returns the paths written.

    `out` is never one of the inputs; an existing `out` (or Modelfile) of another format is replaced only with
    `force`. Temporary files of an earlier export into the same folder that was killed are removed first."""
    if format not in FORMATS:
        raise ConfigError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
    dtype = dtype or DEFAULT_DTYPES[format]
    if dtype not in _FORMAT_DTYPES[format]:
        raise ConfigError(f"--dtype {dtype!r}: {format} is written as one of {', '.join(_FORMAT_DTYPES[format])}")
    out = Path(out)
    if format == "safetensors":
        return [write_merged_folder(model, adapter_dir, out, dtype=dtype)]
    if out.is_dir():
        raise LoratuneError(f"{out}: is a folder; give the .gguf file to write")
    modelfile = modelfile_path(out)
    check_out(out, modelfile, adapter_dir, model, force)
    config = read_adapter_config(adapter_dir)
    pairs = lora_pairs(config, read_adapter_weights(adapter_dir), adapter_dir, KEY_PREFIX) \
        if format == "gguf-lora" else None
    base, tokenizer = load_model(model, "causal-lm")
    layout = layout_for(base.config)
    lt.load_adapter(base, adapter_dir)  # the adapter must fit this model, whatever the format
    source = gguf_source(model)
    remove_leftovers(out.parent, (out.name, modelfile.name, ".gguf", ".Modelfile"))
    with atomic_path(out) as gguf_tmp, atomic_path(modelfile) as modelfile_tmp:
        if pairs is not None:
            tied = bool(getattr(base.config, "tie_word_embeddings", False))
            write_lora_gguf(config, pairs, layout, gguf_tmp, dtype, tied_output=tied, name=Path(adapter_dir).name)
            base_ref = str(source.resolve()) if source is not None else str(Path(model).resolve())
            text = modelfile_text(base_ref, tokenizer, adapter_path=f"./{out.name}")
        else:
            merged = lt.unload(base, merge=True)
            write_model_gguf(merged, tokenizer, layout, gguf_tmp, dtype, tokenizer_gguf=source,
                             name=Path(adapter_dir).name)
            text = modelfile_text(f"./{out.name}", tokenizer)
        modelfile_tmp.write_text(text, encoding="utf-8")
    return [out, modelfile]


def gguf_source(model: str) -> Path | None:
    """The GGUF file a base model is read from (a built-in or a .gguf path), else None."""
    if model in builtin_models():
        path = builtin_path(model)
        return path if path.suffix == ".gguf" else None
    path = Path(model).expanduser()
    return path if path.is_file() and path.suffix.lower() == ".gguf" else None


def modelfile_path(out: str | os.PathLike) -> Path:
    """`sentiment.gguf` -> `sentiment.Modelfile`, so several exports can share a folder."""
    out = Path(out)
    return out.with_name(out.stem + ".Modelfile")
