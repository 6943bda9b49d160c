"""Put LoRA adapters into any `nn.Module`, and manage them: activate, merge, unmerge, unload, delete.

State lives on the model itself: the LoRA layers hold the factors, and `adapter_state(model)` holds each
adapter's `LoraConfig` (also readable as `model.lora_configs`, as PEFT's `peft_config`) and the active list.
Every function checks its input before it changes anything, so an error leaves the model exactly as it was.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from loratune.core.errors import AdapterNameError, MergeError, TargetError
from loratune.core.layers import (
    LINEAR_TYPES,
    QUANTIZED_MERGE,
    LoraLayer,
    LoraLinear,
    ModulesToSave,
    is_quantized,
    layer_dims,
    lora_class_for,
)
from loratune.core.lora_config import ALL_LINEAR, LoraConfig

CONFIGS_ATTR = "lora_configs"
STATE_ATTR = "lora_state"


@dataclass
class AdapterState:
    """What a model holds besides the layers: each adapter's config, and the adapters in use, in order."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)


def adapter_state(model: nn.Module) -> AdapterState:
    """The model's adapter state (created empty on first use); the one place that touches `model.__dict__`.

    Kept out of `nn.Module`'s registries so it never reaches `state_dict` or `named_modules`.
    """
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        state = model.__dict__[STATE_ATTR] = AdapterState()
        model.__dict__[CONFIGS_ATTR] = state.configs  # read-only view for users, by PEFT's example
    return state


def forget_adapter_state(model: nn.Module) -> None:
    model.__dict__.pop(STATE_ATTR, None)
    model.__dict__.pop(CONFIGS_ATTR, None)


# --- inspection ----------------------------------------------------------------------------------------------
def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    return adapter_state(model).configs


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield path, module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for path, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield path, module


class ParamCount(NamedTuple):
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} of {self.total:,} parameters ({100 * self.fraction:.4f}%)"


def trainable_parameters(model: nn.Module) -> ParamCount:
    """Trainable and total parameter counts (shared parameters counted once; a quantized layer's weight,
    stored in buffers, counts as its in x out parameters)."""
    params = list(model.parameters())
    quantized = sum(m.in_features * m.out_features for m in model.modules() if is_quantized(m))
    return ParamCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + quantized)


def check_adapter_name(model: nn.Module, name: str) -> LoraConfig:
    configs = adapter_configs(model)
    if name not in configs:
        known = ", ".join(sorted(configs)) or "none"
        raise AdapterNameError(f"unknown adapter {name!r} (adapters on this model: {known})")
    return configs[name]


def _as_names(model: nn.Module, names: str | Sequence[str] | None) -> list[str]:
    if names is None:
        return active_adapters(model)
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        check_adapter_name(model, name)
    return names


def active_adapters(model: nn.Module) -> list[str]:
    return list(adapter_state(model).active)


# --- finding targets -----------------------------------------------------------------------------------------
def _candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, layer) for every module, seeing through LoRA wrappers to the layer they wrap."""
    skip: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(prefix) for prefix in skip) or not path:
            continue
        if isinstance(module, (LoraLayer, ModulesToSave)):
            skip.append(path + ".")
            inner = module.base_layer if isinstance(module, LoraLayer) else module.original_module
            yield path, inner
        else:
            yield path, module


def _layer_index(path: str, layers_pattern: list[str] | str | None) -> int | None:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    regexes = [rf".*\.(?:{p})\.(\d+)\." for p in patterns] if patterns else [r".*\.[^.]*\.(\d+)\."]
    for regex in regexes:
        match = re.match(regex, path + ".")
        if match:
            return int(match.group(1))
    return None


def output_head_paths(model: nn.Module, task_type: str | None = None) -> set[str]:
    """Paths of the output embedding (LM head) or a SEQ_CLS head, which `all-linear` leaves out as PEFT does."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    paths = {p for p, m in model.named_modules() if head is not None and m is head}
    if not paths and task_type == "SEQ_CLS":
        paths = {n for n in ("score", "classifier") if isinstance(getattr(model, n, None), nn.Module)}
    return paths or {p for p, _ in model.named_modules() if p.split(".")[-1] == "lm_head"}


def _name_matches(spec: list[str] | str, path: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == name or path.endswith("." + name) for name in spec)


def find_targets(model: nn.Module, config: LoraConfig) -> dict[str, nn.Module]:
    """Every module `config` adapts, by path; errors if none match or a match cannot take LoRA."""
    saved = config.modules_to_save or []
    heads = output_head_paths(model, config.task_type) if config.target_modules == ALL_LINEAR else set()
    targets: dict[str, nn.Module] = {}
    layer_indices: set[int | None] = set()  # layers of name matches that layers_to_transform left out
    for path, module in _candidate_modules(model):
        if config.target_modules == ALL_LINEAR:
            hit = isinstance(module, LINEAR_TYPES) and path not in heads and not _name_matches(saved, path)
        else:
            hit = _name_matches(config.target_modules, path)
        if not hit or (config.exclude_modules and _name_matches(config.exclude_modules, path)):
            continue
        if config.layers_to_transform is not None:
            wanted = config.layers_to_transform
            wanted = [wanted] if isinstance(wanted, int) else wanted
            index = _layer_index(path, config.layers_pattern)
            if index not in wanted:
                layer_indices.add(index)
                continue
        if lora_class_for(module) is None:
            raise TargetError(f"target module {path!r} is a {type(module).__name__}; LoRA supports Linear, "
                              "Conv1D, Embedding, Conv1d and Conv2d")
        targets[path] = module
    if not targets and layer_indices:
        found = sorted(i for i in layer_indices if i is not None)
        raise TargetError(f"layers_to_transform={config.layers_to_transform!r} selects none of the matching layers "
                          f"(their indices: {found[0] if found else '?'}..{found[-1] if found else '?'})")
    if not targets:
        names = sorted({p.rsplit(".", 1)[-1] for p, m in _candidate_modules(model) if lora_class_for(m)})
        spec = config.target_modules
        probe = spec if isinstance(spec, str) else (spec[0] if spec else "")
        close = difflib.get_close_matches(probe.rsplit(".", 1)[-1], names, n=5, cutoff=0.3) or names[:5]
        raise TargetError(f"target_modules={spec!r} matched no module; closest names: {', '.join(close)}")
    return targets


# Heads PEFT appends to `modules_to_save` for a task type (whether or not the model has them).
_PEFT_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                    "QUESTION_ANS": ("qa_outputs",)}


def _find_saved(model: nn.Module, names: list[str], task_type: str | None = None) -> dict[str, nn.Module]:
    """Modules named in `modules_to_save`; a PEFT task head the model lacks is not an error, as in PEFT."""
    found = {p: m for p, m in _candidate_modules(model) if _name_matches(names, p)}
    optional = _PEFT_TASK_HEADS.get(task_type or "", ())
    missing = [n for n in dict.fromkeys(names) if n not in optional and not any(_name_matches([n], p) for p in found)]
    if missing:
        raise TargetError(f"modules_to_save {missing} matched no module")
    return found


def resolve_target_names(model: nn.Module, config: LoraConfig, targets: dict[str, nn.Module]) -> LoraConfig:
    """Write `all-linear` out as module paths, as PEFT does, so the saved config needs no model to read."""
    if config.target_modules != ALL_LINEAR:
        return config
    resolved = copy.copy(config)
    resolved.target_modules = sorted(targets)
    return resolved


# --- adding and removing -------------------------------------------------------------------------------------
def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def add_adapter(model: nn.Module, config: LoraConfig, name: str = "default") -> nn.Module:
    """Wrap the modules `config` targets with LoRA layers holding a new adapter `name`, and freeze the rest.

    The first adapter on a model becomes active; later ones are added inactive (see `set_active_adapters`),
    as in PEFT. Returns the same model, changed in place.
    """
    inject(model, config, name, initialize=True)
    if not active_adapters(model):
        set_active_adapters(model, [name])
    mark_trainable(model, name)
    return model


def check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise AdapterNameError(f"adapter name must be a non-empty string without '.', got {name!r}")
    if name in adapter_configs(model):
        raise AdapterNameError(f"adapter name {name!r} is already taken")


def inject(model: nn.Module, config: LoraConfig, name: str, initialize: bool) -> None:
    check_new_name(model, name)
    targets = find_targets(model, config)
    pissa = initialize and config.init_lora_weights == "pissa"
    saved = _find_saved(model, config.modules_to_save or [], config.task_type)
    overlap = sorted(set(targets) & set(saved))
    if overlap:
        raise TargetError(f"module {overlap[0]!r} is both a LoRA target and in modules_to_save")
    for path, module in saved.items():
        if any(is_quantized(m) for m in module.modules()):
            raise TargetError(f"modules_to_save {path!r} holds layers stored quantized, which cannot be trained in "
                              "full; leave it out of modules_to_save or load the model without quantize")
    for feature, used in (("use_dora", config.use_dora), ("init_lora_weights='pissa'", pissa)):
        for path, module in targets.items():
            if used and lora_class_for(module) is not LoraLinear:
                raise TargetError(f"{feature} supports Linear and Conv1D layers; {path!r} is a {type(module).__name__}")
    for path, module in targets.items():  # r above one dim is allowed (PEFT files have it, e.g. on 2-way heads)
        rank, (in_dim, out_dim) = config.rank_for(path), layer_dims(module)
        if rank > max(in_dim, out_dim) or (pissa and rank > min(in_dim, out_dim)):
            raise TargetError(f"r={rank} is larger than layer {path!r} allows (in={in_dim}, out={out_dim})")

    # Build everything first: a failure here must not leave a half-adapted model.
    wrappers = {path: _wrapper_for(model, path, module) for path, module in targets.items()}
    init = config.init_lora_weights if initialize else True
    for path, layer in wrappers.items():
        layer.create(name, config.rank_for(path), config.scaling_for(path), config.lora_dropout, init)
        if config.use_dora:
            layer.enable_dora(name)
    saved_wrappers = {path: _saved_wrapper_for(model, path, module) for path, module in saved.items()}
    for wrapper in saved_wrappers.values():
        wrapper.modules_to_save[name] = trainable_copy(wrapper.original_module)

    for path, layer in {**wrappers, **saved_wrappers}.items():
        layer.train(targets.get(path, saved.get(path)).training)  # an eval-mode model stays in eval mode
        if model.get_submodule(path) is not layer:
            set_module(model, path, layer)
    adapter_configs(model)[name] = resolve_target_names(model, config, targets)


def trainable_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` to train in full (a `modules_to_save` copy). A layer whose stored form cannot train
    (e.g. a frozen weight kept in 16 bits for fp32 products) says so by offering `as_trainable()`, a copy of
    itself that can; it is used for that layer, alone or inside `module`."""
    if hasattr(module, "as_trainable"):
        return module.as_trainable()
    copied = copy.deepcopy(module)
    for path, sub in list(copied.named_modules()):
        if path and hasattr(sub, "as_trainable"):
            set_module(copied, path, sub.as_trainable())
    return copied


def _wrapper_for(model: nn.Module, path: str, module: nn.Module) -> LoraLayer:
    current = model.get_submodule(path)
    if isinstance(current, LoraLayer):
        return current
    return lora_class_for(module)(module)


def _saved_wrapper_for(model: nn.Module, path: str, module: nn.Module) -> ModulesToSave:
    current = model.get_submodule(path)
    return current if isinstance(current, ModulesToSave) else ModulesToSave(module)


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Every parameter that belongs to adapter `name`, keyed by its path in the model."""
    params = {}
    for path, layer in lora_layers(model):
        if name in layer.scaling:
            for key, param in layer.adapter_tensors(name).items():
                params[f"{path}.{key}"] = param
    for path, wrapper in saved_modules(model):
        if name in wrapper.modules_to_save:
            for key, param in wrapper.modules_to_save[name].named_parameters():
                params[f"{path}.{key}"] = param
    return params


def bias_parameters(model: nn.Module, bias: str) -> dict[str, nn.Parameter]:
    """Biases trained and saved with an adapter: none, all of the model's, or those of LoRA layers only."""
    if bias == "none":
        return {}
    if bias == "lora_only":
        return {f"{path}.base_layer.bias": layer.base_layer.bias for path, layer in lora_layers(model)
                if getattr(layer.base_layer, "bias", None) is not None}
    return {path: p for path, p in model.named_parameters() if path.split(".")[-1] == "bias"
            and "lora_" not in path and ".original_module." not in path and ".modules_to_save." not in path}


def mark_trainable(model: nn.Module, name: str, trainable: bool = True) -> None:
    """Freeze everything, then let adapter `name` (its factors, saved modules and biases) train."""
    for param in model.parameters():
        param.requires_grad_(False)
    if not trainable:
        return
    config = check_adapter_name(model, name)
    for param in adapter_parameters(model, name).values():
        param.requires_grad_(True)
    for param in bias_parameters(model, config.bias).values():
        param.requires_grad_(True)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove an adapter; layers left with no adapter are replaced by the original module."""
    check_adapter_name(model, name)
    for path, layer in list(lora_layers(model)):
        if name not in layer.scaling:
            continue
        if name in layer.merged:
            others = [n for n in layer.merged if n != name]
            layer.unmerge()
            layer.merge(others)
        layer.remove(name)
        if not layer.scaling:
            set_module(model, path, layer.base_layer)
    for path, wrapper in list(saved_modules(model)):
        if name in wrapper.modules_to_save:
            del wrapper.modules_to_save[name]
            wrapper.active = None if wrapper.active == name else wrapper.active
            if not len(wrapper.modules_to_save):
                set_module(model, path, wrapper.original_module)
    del adapter_configs(model)[name]
    set_active_adapters(model, [n for n in active_adapters(model) if n != name])


def set_active_adapters(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make `names` the adapters in use; with several, their updates add up."""
    names = _as_names(model, names)
    adapter_state(model).active = names
    for _, layer in lora_layers(model):
        layer.active = [n for n in names if n in layer.scaling]
    for _, wrapper in saved_modules(model):
        wrapper.active = next((n for n in names if n in wrapper.modules_to_save), None)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block (merged adapters are unmerged, then merged back)."""
    layers = [layer for _, layer in lora_layers(model)]
    merged = {id(layer): list(layer.merged) for layer in layers}
    wrappers = [w for _, w in saved_modules(model)]
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    for wrapper in wrappers:
        wrapper.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
            layer.merge(merged[id(layer)])
        for wrapper in wrappers:
            wrapper.disabled = False


# --- merging -------------------------------------------------------------------------------------------------
def merge(model: nn.Module, names: str | Sequence[str] | None = None, safe: bool = False) -> None:
    """Fold adapters (default: the active ones) into the base weights, computing in fp32.

    With `safe=True` a non-finite result raises `MergeError` and every weight is restored.
    """
    names = _as_names(model, names)
    layers = [layer for _, layer in lora_layers(model)]
    if any(is_quantized(layer.base_layer) for layer in layers):
        raise MergeError(QUANTIZED_MERGE)
    _refuse_tied_weights(model, [(p, layer) for p, layer in lora_layers(model) if set(names) & set(layer.scaling)])
    backups = {}
    try:
        for layer in layers:
            if safe:
                backups[id(layer)] = (layer.base_layer.weight.detach().clone(), list(layer.merged))
            layer.merge(names, safe=safe)
    except MergeError:
        for layer in layers:
            if id(layer) in backups:
                weight, merged = backups[id(layer)]
                with torch.no_grad():
                    layer.base_layer.weight.copy_(weight)
                layer.merged[:] = merged
        raise


def _refuse_tied_weights(model: nn.Module, layers: list[tuple[str, LoraLayer]]) -> None:
    """Merging into a weight shared with another module (tied embeddings) would change that module too."""
    owners: dict[int, list[str]] = {}
    for path, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(path)
    for path, layer in layers:
        others = [p for p in owners.get(id(layer.base_layer.weight), []) if not p.startswith(path + ".")]
        if others:
            raise MergeError(f"cannot merge into {path!r}: its weight is tied to {others[0]!r}, which would change too")


_merge = merge  # `unload` takes a parameter named `merge`


def unmerge(model: nn.Module) -> None:
    """Take every merged adapter back out of the base weights (exact up to dtype rounding)."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Return a plain model without LoRA modules; with `merge`, the active adapters' updates are kept."""
    names = active_adapters(model)
    if merge and names:
        _merge(model, names)
    else:
        unmerge(model)
    for path, layer in list(lora_layers(model)):
        set_module(model, path, layer.base_layer)
    for path, wrapper in list(saved_modules(model)):
        keep = wrapper.current() if merge else wrapper.original_module
        set_module(model, path, keep)
    forget_adapter_state(model)
    return model
