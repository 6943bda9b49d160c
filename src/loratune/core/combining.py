"""Combining adapters: a weighted sum of existing adapters as a new one, and batches whose rows each use
their own adapter (the server's decode step).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from loratune.core.adapters import (
    active_adapters,
    adapter_configs,
    check_adapter_name,
    check_new_name,
    lora_layers,
    resolve_target_names,
    set_active_adapters,
)
from loratune.core.errors import AdapterNameError, MergeError, TargetError
from loratune.core.layers import LoraLayer
from loratune.core.lora_config import LoraConfig


def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], name: str,
                         combination_type: str = "cat", svd_rank: int | None = None) -> None:
    """Add adapter `name` whose update is sum_i weights[i] * delta_i of existing adapters.

    `cat` stacks the factors (rank = sum of ranks) and reproduces the weighted sum exactly; `svd` keeps
    the best rank-`svd_rank` approximation of it.
    """
    if len(adapters) != len(weights) or not adapters:
        raise AdapterNameError("add_weighted_adapter needs one weight per adapter, and at least one adapter")
    configs = [check_adapter_name(model, a) for a in adapters]
    check_new_name(model, name)
    if any(c.modules_to_save for c in configs) or any(c.use_dora for c in configs):
        raise TargetError("add_weighted_adapter cannot combine adapters with modules_to_save or DoRA")
    if combination_type not in ("cat", "svd"):
        raise TargetError(f"combination_type must be 'cat' or 'svd', got {combination_type!r}")
    rank = sum(max([c.r, *c.rank_pattern.values()]) for c in configs) if combination_type == "cat" else (
        svd_rank or max(c.r for c in configs))
    layers = {path: layer for path, layer in lora_layers(model) if any(a in layer.scaling for a in adapters)}
    if combination_type == "svd" and any(rank > min(layer.to_oi_shape()) for layer in layers.values()):
        raise TargetError(f"svd_rank={rank} is larger than a target layer allows")
    new_factors = {path: _combine(layer, adapters, weights, rank, combination_type) for path, layer in layers.items()}

    base = configs[0]
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(layers),  # exact paths
                        task_type=base.task_type, base_model_name_or_path=base.base_model_name_or_path)
    targets = {path: layer.base_layer for path, layer in layers.items()}
    for path, layer in layers.items():
        layer.create(name, rank, 1.0, 0.0, True)
        a_param, b_param = layer.factors(name)
        with torch.no_grad():  # factors() are views of the parameters, so this writes through
            a_param.copy_(new_factors[path][0])
            b_param.copy_(new_factors[path][1])
    adapter_configs(model)[name] = resolve_target_names(model, config, targets)
    set_active_adapters(model, active_adapters(model))


def _combine(layer: LoraLayer, adapters: Sequence[str], weights: Sequence[float], rank: int,
             combination_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """New (A, B) for one layer, with scaling 1: B @ A = sum_i w_i * s_i * B_i @ A_i."""
    out_dim, in_dim = layer.to_oi_shape()
    pairs = [(w * layer.scaling[a], *layer.factors(a)) for a, w in zip(adapters, weights) if a in layer.scaling]
    if combination_type == "svd":
        delta = sum(s * (b.float() @ a.float()) for s, a, b in pairs)
        u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
        return vh[:rank], u[:, :rank] * sv[:rank]
    a_new = torch.zeros(rank, in_dim)
    b_new = torch.zeros(out_dim, rank)
    offset = 0
    for s, a, b in pairs:
        r = a.shape[0]
        a_new[offset:offset + r] = s * a.detach().float()
        b_new[:, offset:offset + r] = b.detach().float()
        offset += r
    return a_new, b_new


@contextmanager
def mixed_adapter_batch(model: nn.Module, row_adapters: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row i of every batch uses adapter `row_adapters[i]` (None: the base model).

    Each LoRA layer gathers the per-row factors from a stack and applies them with two batched matmuls,
    so a batch that mixes many adapters costs about as much as one adapter. For inference (no dropout).
    """
    names = sorted({n for n in row_adapters if n is not None})
    configs = {n: check_adapter_name(model, n) for n in names}
    if any(c.use_dora for c in configs.values()) or any(c.modules_to_save for c in configs.values()):
        raise TargetError("mixed-adapter batches do not support DoRA adapters or modules_to_save")
    slot = {n: i + 1 for i, n in enumerate(names)}
    rows = torch.tensor([slot[n] if n is not None else 0 for n in row_adapters], dtype=torch.long)
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged for layer in layers):
        raise MergeError("unmerge adapters before running a mixed-adapter batch")
    try:
        for layer in layers:
            layer.set_row_plan(rows, names)
        yield model
    finally:
        for layer in layers:
            layer.row_plan = None
