"""Load a model straight into quantized form, one tensor at a time, so a model larger than memory in full
precision never exists in memory in full precision.

The model is built on the `meta` device (no storage), then each tensor of the safetensors files is read
with plain file reads (no memory map, whose touched pages would count towards the process's resident
memory) and either quantized into a `QuantLinear` or kept, in the compute dtype. Peak memory is the
quantized model plus about one full-precision tensor.

For FSDP2 (`shard=(rank, world)`) each process reads the files itself and keeps, of every quantized layer
inside a transformer block, only the rows of its codes and scales that FSDP2 will give it: its peak is then
1/world of the quantized blocks, plus what lies outside the blocks (embeddings, head: whole on every rank,
as FSDP2 keeps them), plus one full-precision tensor and its whole quantized form.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loratune.allocator import release_free_memory
from loratune.core.adapters import output_head_paths, set_module
from loratune.core.layers import Conv1D
from loratune.errors import ModelLoadError
from loratune.quant.convert import check_model_quantizable, transformer_blocks
from loratune.quant.linear import QuantLinear

#: safetensors' dtype names (the header's "dtype" field)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a model folder: the shards named by the index, or the single file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit


def read_header(path: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    """(header size, {key: {dtype, shape, data_offsets}}) of a safetensors file, in file order.

    Every size the header claims is checked against the file's length before anything is allocated, so a
    damaged or hostile header cannot make a reader allocate more than the file holds."""
    try:
        file_size = path.stat().st_size
        with path.open("rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            if header_size > min(MAX_HEADER_BYTES, file_size - 8):
                raise ValueError(f"header claims {header_size} bytes, the file has {file_size}")
            header = json.loads(handle.read(header_size))
        header.pop("__metadata__", None)
        entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        for key, info in entries:
            if _check_entry(key, info) > file_size - 8 - header_size:
                raise ModelLoadError(f"{path}: file is truncated inside tensor {key!r}")
    except ModelLoadError:
        raise
    except (struct.error, ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        raise ModelLoadError(f"{path}: not a safetensors file ({exc})") from exc
    return header_size, dict(entries)


def _check_entry(key: str, info: dict[str, Any]) -> int:
    """A tensor's dtype is known and its offsets and shape agree; returns where its data ends."""
    if info["dtype"] not in SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {key!r} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    shape = info["shape"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (start, end, *shape)):
        raise ValueError(f"tensor {key!r}: offsets and shape must be non-negative integers")
    count = 1
    for size in shape:
        count *= size
    if not start <= end or end - start != count * SAFETENSORS_DTYPES[info["dtype"]].itemsize:
        raise ValueError(f"tensor {key!r}: offsets {start}..{end} do not fit its shape {shape}")
    return end


def read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) from a safetensors file in file order, reading each tensor on its own."""
    header_size, header = read_header(path)
    with path.open("rb") as handle:
        for key, info in header.items():
            start, end = info["data_offsets"]
            handle.seek(8 + header_size + start)
            raw = bytearray(end - start)
            if handle.readinto(raw) != len(raw):
                raise ModelLoadError(f"{path}: file is truncated inside tensor {key!r}")
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            tensor = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            try:
                yield key, tensor.view(info["shape"])
            except RuntimeError as exc:
                raise ModelLoadError(f"{path}: tensor {key!r} does not match its shape {info['shape']}") from exc


class NotStreamable(Exception):
    """The files do not map one to one onto the model (renamed or fused keys): load through transformers."""


def load_quantized(folder: Path, model_class: Any, config: Any, format: str, double_quant: bool = True,
                   dtype: torch.dtype = torch.bfloat16, trust_remote_code: bool = False,
                   shard: tuple[int, int] | None = None) -> nn.Module:
    """Build `model_class` from `config` with its linear layers in `format`, reading `folder`'s safetensors;
    with `shard=(rank, world)` the quantized layers inside transformer blocks keep only `rank`'s rows
    (`QuantLinear.keep_shard`) and run once FSDP2 has sharded their blocks.

    The file headers are checked against the model first: a missing weight or a shape mismatch is a
    `ModelLoadError`, and keys that need renaming raise `NotStreamable`, before any weight is read. Weights
    the files may lack are output heads (a new classifier), initialised by the model's own init as
    `from_pretrained` does; the caller seeds the generator.
    """
    files = safetensors_files(folder)
    if not files:
        raise ModelLoadError(f"{folder}: no safetensors weights to stream (model.safetensors or an index)")
    with torch.device("meta"):
        model = model_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    targets = check_model_quantizable(model, format)
    names = _plan(files, model)
    blocks = tuple(path + "." for path in transformer_blocks(model)) if shard else ()
    for file in files:
        for key, tensor in read_tensors(file):
            if key not in names:
                continue
            path, _, leaf = names[key].rpartition(".")
            if path in targets and leaf == "weight":
                layer = _place_quantized(model, path, targets[path], tensor, format, double_quant, dtype)
                if shard and path.startswith(blocks):
                    layer.keep_shard(*shard)
            else:
                _place_tensor(model, path, leaf, tensor, dtype)
            del tensor
            release_free_memory()
    _finish(model, targets)
    release_free_memory()
    return model


def _plan(files: list[Path], model: nn.Module) -> dict[str, str]:
    """{file key: model key} for every tensor to load, after checking names and shapes against the model."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ignorable = {k for k, _ in model.named_buffers()} - set(expected)  # non-persistent buffers, rebuilt anyway
    prefix = getattr(model, "base_model_prefix", "")
    names: dict[str, str] = {}
    for file in files:
        for key, info in read_header(file)[1].items():
            name = _model_key(key, set(expected) | ignorable, prefix)
            if name in ignorable:
                continue
            if name is None:
                raise NotStreamable(f"checkpoint key {key!r} has no parameter of that name in the model")
            if tuple(info["shape"]) != expected[name]:
                raise ModelLoadError(f"{file}: tensor {key!r} has shape {tuple(info['shape'])}, the model "
                                     f"expects {expected[name]} (config.json and weights disagree)")
            names[key] = name
    heads = tuple(p + "." for p in output_head_paths(model) | output_head_paths(model, "SEQ_CLS"))
    loaded = set(names.values())
    shared: dict[int, set[str]] = {}
    for key, param in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(param), set()).add(key)
    for key in sorted(set(expected) - loaded):
        tied = any(key in group and group & loaded for group in shared.values())
        if not tied and not key.startswith(heads):
            raise ModelLoadError(f"model weight {key!r} is missing from the model files")
    return names


def _model_key(key: str, known: set[str], prefix: str) -> str | None:
    """The model's name for a file key: the same, or with the base-model prefix added or removed."""
    if key in known:
        return key
    if prefix and f"{prefix}.{key}" in known:
        return f"{prefix}.{key}"
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in known:
        return key[len(prefix) + 1:]
    return None


def _place_quantized(model: nn.Module, path: str, meta_layer: nn.Module, weight: torch.Tensor, format: str,
                     double_quant: bool, dtype: torch.dtype) -> QuantLinear:
    layer = QuantLinear.from_weight(weight, None, format, double_quant, conv1d=isinstance(meta_layer, Conv1D),
                                    dtype=dtype, where=f"layer {path!r}")
    layer.bias = meta_layer.bias  # real if the file held it before the weight, else filled in later
    layer._is_hf_initialized = True  # transformers' init must not touch it
    set_module(model, path, layer)
    return layer


def _place_tensor(model: nn.Module, path: str, leaf: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    module = model.get_submodule(path)
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    if leaf in module._parameters:
        param = nn.Parameter(tensor, requires_grad=False)
        param._is_hf_initialized = True
        module._parameters[leaf] = param
    else:
        tensor._is_hf_initialized = True
        module._buffers[leaf] = tensor


def _finish(model: nn.Module, targets: dict[str, nn.Module]) -> None:
    """Give real storage to what the files did not hold, initialise it, and tie weights."""
    for path in targets:
        layer = model.get_submodule(path)
        if not isinstance(layer, QuantLinear) or (layer.bias is not None and layer.bias.device.type == "meta"):
            raise ModelLoadError(f"weights of layer {path!r} are missing from the model files")
    model.tie_weights()  # before storage is given: a tied head must not get a full-size copy of its own
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, tensor in table.items():
                if tensor is not None and tensor.device.type == "meta":
                    fresh = torch.empty_like(tensor, device="cpu")
                    table[key] = nn.Parameter(fresh, requires_grad=False) if isinstance(tensor, nn.Parameter) else fresh
    model.initialize_weights()
    model.tie_weights()
    model.requires_grad_(False)
    model.eval()
