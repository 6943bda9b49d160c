"""Adapter files in PEFT's layout: `adapter_config.json` and `adapter_model.safetensors`.

A file key is `base_model.model.<module path>.<PEFT key>`, where the PEFT key is a LoRA layer's
attribute path with the adapter name removed (`lora_A.weight`, `lora_embedding_A`,
`lora_magnitude_vector`) or, for `modules_to_save`, the module's own parameter name.
This module is the only place that knows these file names and the key prefix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from loratune.core.adapters import (
    active_adapters,
    adapter_configs,
    adapter_parameters,
    bias_parameters,
    check_adapter_name,
    delete_adapter,
    find_targets,
    inject,
    lora_layers,
    mark_trainable,
    set_active_adapters,
)
from loratune.core.atomic_write import atomic_path
from loratune.core.errors import AdapterFileError, ConfigError, LoratuneError
from loratune.core.layers import Conv1D
from loratune.core.lora_config import LoraConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's file keys."""
    config = check_adapter_name(model, name)
    state = {}
    for path, param in {**adapter_parameters(model, name), **bias_parameters(model, config.bias)}.items():
        state[KEY_PREFIX + _strip_adapter_name(path, name)] = param.detach()
    return state


def _strip_adapter_name(path: str, name: str) -> str:
    parts = path.split(".")
    for i in range(1, len(parts)):
        if parts[i] == name and parts[i - 1] in _NAMED_CONTAINERS:
            del parts[i]
            if parts[i - 1] == "modules_to_save":
                del parts[i - 1]
            break
    return ".".join(parts)


_NAMED_CONTAINERS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                     "modules_to_save"}


def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter `name` as `adapter_config.json` + `adapter_model.safetensors` (each written atomically)."""
    state = adapter_state_dict(model, name)
    config = adapter_configs(model)[name]
    data = config.to_dict()
    data["fan_in_fan_out"] = bool(Conv1D) and any(  # a quantized Conv1D keeps the original layout's flag
        isinstance(layer.base_layer, Conv1D) or getattr(layer.base_layer, "from_conv1d", False)
        for _, layer in lora_layers(model) if name in layer.scaling)
    directory = Path(directory)
    created = not directory.exists()
    tensors = {k: v.to("cpu").contiguous() for k, v in state.items()}
    # Both files are complete on disk before either is renamed into place.
    try:
        with atomic_path(directory / WEIGHTS_NAME) as weights_tmp, atomic_path(directory / CONFIG_NAME) as config_tmp:
            save_file(tensors, str(weights_tmp), metadata={"format": "pt"})
            config_tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    except BaseException:
        if created and directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()  # a failed save leaves no empty adapter folder behind
        raise
    return directory


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterFileError(f"{path}: no adapter config here (expected {CONFIG_NAME})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path}: expected a JSON object")
    try:
        return LoraConfig.from_dict(data, source=str(path))
    except ConfigError as exc:  # a value's error may not name the file yet
        message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
        raise AdapterFileError(message) from None


def read_adapter_weights(directory: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read the weights; safetensors only, unless the caller explicitly allows a pickle `.bin` file."""
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickle_path = directory / PICKLE_WEIGHTS_NAME
        if pickle_path.is_file() and not allow_pickle:
            raise AdapterFileError(f"{pickle_path}: refusing a pickle adapter file, since unpickling can run code; "
                                   "convert it to safetensors, or pass allow_pickle=True if you trust it")
        if pickle_path.is_file():
            try:
                return torch.load(pickle_path, map_location="cpu", weights_only=True)
            except Exception as exc:  # any unpickling failure is a bad file, whatever its type
                raise AdapterFileError(f"{pickle_path}: cannot read pickle adapter ({type(exc).__name__})") from None
        raise AdapterFileError(f"{directory}: no adapter weights here (expected {WEIGHTS_NAME})")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(f"{path}: corrupt or truncated safetensors file ({exc})") from None


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None, trainable: bool = False,
                 allow_pickle: bool = False) -> str:
    """Add the adapter stored in `directory` (PEFT layout, from loratune or PEFT) as `name`; returns the name.

    Shapes are checked against the model; on any mismatch the model is left exactly as it was.
    """
    name = name or "default"
    config = read_adapter_config(directory)
    weights = read_adapter_weights(directory, allow_pickle=allow_pickle)
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    active = active_adapters(model)
    existed = name in adapter_configs(model)
    try:
        _check_targets(model, config, directory)
        inject(model, config, name, initialize=False)
        _copy_weights(model, name, config, weights, directory)
    except LoratuneError:
        if not existed and name in adapter_configs(model):
            delete_adapter(model, name)
        for param in model.parameters():
            param.requires_grad_(requires_grad.get(id(param), param.requires_grad))
        set_active_adapters(model, active)
        raise
    set_active_adapters(model, active or [name])
    if trainable:
        mark_trainable(model, name)
    else:
        for param in model.parameters():
            param.requires_grad_(requires_grad.get(id(param), False))
    return name


def _check_targets(model: nn.Module, config: LoraConfig, directory: str | os.PathLike) -> None:
    try:
        find_targets(model, config)
    except LoratuneError as exc:
        raise AdapterFileError(f"{directory}: adapter does not fit this model: {exc}") from None


def _copy_weights(model: nn.Module, name: str, config: LoraConfig, weights: dict[str, torch.Tensor],
                  directory: str | os.PathLike) -> None:
    """Check every expected key and shape first, then copy: a mismatch changes nothing."""
    expected = {KEY_PREFIX + _strip_adapter_name(path, name): param
                for path, param in adapter_parameters(model, name).items()}
    biases = {KEY_PREFIX + path: param for path, param in bias_parameters(model, config.bias).items()}
    for key, param in expected.items():
        if key not in weights:
            raise AdapterFileError(f"{directory}: adapter file lacks {key!r}, which this model needs")
        if tuple(weights[key].shape) != tuple(param.shape):
            raise AdapterFileError(f"{directory}: {key!r} has shape {tuple(weights[key].shape)} in the file but "
                                   f"{tuple(param.shape)} in the model")
    unexpected = [k for k in weights if k not in expected and k not in biases]
    if unexpected:
        raise AdapterFileError(f"{directory}: adapter file has {unexpected[0]!r}, which matches nothing in this model")
    for key, tensor in weights.items():
        target = biases.get(key)
        if target is not None and tuple(tensor.shape) != tuple(target.shape):
            raise AdapterFileError(f"{directory}: {key!r} has shape {tuple(tensor.shape)} in the file but "
                                   f"{tuple(target.shape)} in the model")
    bad = first_non_finite(weights)
    if bad is not None:  # a diverged run's weights would merge, export and serve as NaN
        raise AdapterFileError(f"{directory}: {bad!r} holds non-finite values (NaN or inf); refusing the adapter")
    with torch.no_grad():
        for key, tensor in weights.items():
            target = expected.get(key, biases.get(key))
            target.copy_(tensor.to(target.dtype))


def first_non_finite(weights: dict[str, torch.Tensor]) -> str | None:
    """The first key whose tensor holds NaN or inf, else None."""
    return next((key for key, tensor in weights.items()
                 if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())), None)


def load_adapter_weights_into(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> None:
    """Overwrite an existing adapter's tensors with those stored in `directory` (used to resume training)."""
    config = check_adapter_name(model, name)
    _copy_weights(model, name, config, read_adapter_weights(directory), directory)
