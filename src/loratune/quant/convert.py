"""Whole-model operations: quantize the frozen linear layers (optionally with LoftQ), and merge back.

Output heads (the LM head, a classifier) stay in full precision, as in QLoRA: they are small next to
the body, tied to the embeddings in many models, and trained in full for classification.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from loratune.core.adapters import lora_layers, output_head_paths, set_module, unload
from loratune.core.layers import LINEAR_TYPES, Conv1D, LoraLayer, LoraLinear, ModulesToSave, is_quantized, layer_dims
from loratune.errors import QuantizationError
from loratune.quant.linear import QuantLinear
from loratune.quant.storage import check_quantizable


@dataclass
class QuantReport:
    """What quantizing did: layers converted, bytes before and after, and the relative weight error
    ||W - W_q|| / ||W|| over all converted layers (with LoftQ: W_q includes the adapter's initial update)."""

    layers: int
    dense_bytes: int
    quantized_bytes: int
    relative_error: float
    relative_error_without_loftq: float | None = None


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Frozen linear layers to store quantized, by path: every Linear/Conv1D except output heads and
    modules trained in full. For a LoRA layer the path names the wrapper; its `base_layer` is converted."""
    heads = output_head_paths(model) | output_head_paths(model, "SEQ_CLS")
    inside = [p + "." for p, m in model.named_modules() if isinstance(m, (ModulesToSave, LoraLayer))]
    skipped = tuple(inside) + tuple(h + "." for h in heads)  # a head's own layers (e.g. classifier.dense) too
    found: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if path in heads or path.startswith(skipped):
            continue
        base = module.base_layer if isinstance(module, LoraLinear) else module
        if isinstance(base, LINEAR_TYPES) and not is_quantized(base):
            found[path] = module
    return found


def transformer_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The repeated blocks of a transformers model (its `_no_split_modules` classes), by path: the units FSDP2
    shards (train.distributed), whose quantized layers `quant.streaming` can load as one rank's shard."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return {path: m for path, m in model.named_modules() if type(m).__name__ in names}


def check_model_quantizable(model: nn.Module, format: str) -> dict[str, nn.Module]:
    """The layers `quantize_model` would convert; a clear error if none, or if one cannot take `format`."""
    layers = quantizable_layers(model)
    if not layers:
        raise QuantizationError(f"quantize: {format}: the model has no linear layers to quantize")
    for path, module in layers.items():
        in_dim, out_dim = layer_dims(getattr(module, "base_layer", module))
        check_quantizable(format, (out_dim, in_dim), f"layer {path!r}")
    return layers


@torch.no_grad()
def quantize_model(model: nn.Module, format: str, double_quant: bool = True, loftq_iterations: int = 0,
                   adapter: str = "default") -> QuantReport:
    """Replace the frozen linear layers by `QuantLinear`s in place, one at a time (the dense weight of a
    layer is freed as soon as its quantized copy exists).

    With `loftq_iterations > 0`, LoRA layers holding `adapter` get LoftQ initialisation: alternately
    quantize W - s*B@A and set B, A to the top singular directions of the remaining error, so that
    base + adapter starts closer to the full-precision W than the quantized base alone.
    """
    layers = check_model_quantizable(model, format)
    dense_bytes = quantized_bytes = 0
    error_sq = plain_error_sq = norm_sq = 0.0
    for path, module in layers.items():
        base = getattr(module, "base_layer", module)
        dense_bytes += base.weight.numel() * base.weight.element_size()
        quantized = QuantLinear.from_linear(base, format, double_quant, f"layer {path!r}")
        weight_oi = (base.weight.t() if quantized.from_conv1d else base.weight).float()
        norm_sq += weight_oi.square().sum().item()
        layer_error = (weight_oi - quantized.dequantize(torch.float32)).square().sum().item()
        plain_error_sq += layer_error
        if loftq_iterations and isinstance(module, LoraLinear) and adapter in module.lora_A:
            layer_error = _loftq(module, adapter, weight_oi, quantized, loftq_iterations)
        error_sq += layer_error
        quantized.train(base.training)
        quantized_bytes += quantized.packed.nbytes()
        if isinstance(module, LoraLinear):
            module.replace_base_layer(quantized)  # QuantLinear stores (out, in) whatever the original layout
        else:
            set_module(model, path, quantized)
        del base, weight_oi
    plain = math.sqrt(plain_error_sq / max(norm_sq, 1e-30))
    error = math.sqrt(error_sq / max(norm_sq, 1e-30))
    return QuantReport(len(layers), dense_bytes, quantized_bytes, error, plain if loftq_iterations else None)


LOFTQ_SEED = 0


def _loftq(layer: LoraLinear, name: str, weight: torch.Tensor, quantized: QuantLinear, iterations: int) -> float:
    """LoftQ (Li et al. 2023): sets the adapter's factors and the quantized residual in place; returns the
    squared error W - (Q + s*B@A) left. Seeded, so the same weights always give the same base."""
    scaling = layer.scaling[name]
    a_param, b_param = layer.lora_A[name].weight, layer.lora_B[name].weight
    rank = a_param.shape[0]
    a, b = torch.zeros_like(a_param, dtype=torch.float32), torch.zeros_like(b_param, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(LOFTQ_SEED)
        for step in range(iterations):
            if step:
                quantized.store(weight - scaling * b @ a)
            error = weight - quantized.dequantize(torch.float32)
            u, s, v = torch.svd_lowrank(error, q=min(rank + 8, *error.shape), niter=4)
            k = min(rank, s.numel())  # a rank above the layer's smaller side leaves the rest zero
            root = torch.sqrt(s[:k] / scaling)
            b[:, :k], a[:k] = u[:, :k] * root, (v[:, :k] * root).t()
    a_param.copy_(a)
    b_param.copy_(b)
    return (weight - quantized.dequantize(torch.float32) - scaling * b @ a).square().sum().item()


@dataclass
class MergeReport:
    """Merging into quantized layers: ||W_stored - (W_deq + delta)|| / ||W_deq + delta|| over all layers,
    i.e. the error that storing the merged weight added (rounding to `dtype`, or requantization)."""

    layers: int
    relative_error: float
    requantized: bool


@torch.no_grad()
def merge_quantized(model: nn.Module, requantize: bool = False, dtype: torch.dtype | None = None) -> MergeReport:
    """`unload(model)` for a model with quantized layers: fold the active adapters in and remove LoRA.

    Each quantized weight under a LoRA layer is dequantized, the update added in fp32, and the result
    stored as a dense layer (`nn.Linear`, or `Conv1D` where the model had one) in `dtype` (default: the
    dense layer's original dtype) or, with `requantize`, quantized again in the layer's format. LoRA layers
    over dense weights are merged exactly, as `unload` does; quantized layers without LoRA stay quantized.
    """
    error_sq = norm_sq = 0.0
    count = 0
    for path, layer in list(lora_layers(model)):
        base = layer.base_layer
        if not is_quantized(base):
            continue
        merged = base.dequantize(torch.float32)
        for name in layer.pending():
            merged = layer.merged_weight(merged, name)
        if requantize:
            new = QuantLinear.from_weight(merged, base.bias, base.format, base.double_quant, dtype=base.dtype)
            new.from_conv1d = base.from_conv1d
            stored = new.dequantize(torch.float32)
        else:
            new = _dense_layer(base, merged, dtype or base.dtype)
            stored = (new.weight.t() if base.from_conv1d else new.weight).float()
        error_sq += (stored - merged).square().sum().item()
        norm_sq += merged.square().sum().item()
        new.train(base.training)
        set_module(model, path, new)
        count += 1
    if not count:
        raise QuantizationError("merge_quantized: the model has no LoRA layers over quantized weights")
    unload(model, merge=True)
    return MergeReport(count, math.sqrt(error_sq / max(norm_sq, 1e-30)), requantize)


def _dense_layer(base: QuantLinear, weight_oi: torch.Tensor, dtype: torch.dtype) -> nn.Module:
    """A frozen dense layer of the kind the model had, holding `weight_oi` (out, in) in `dtype`."""
    if base.from_conv1d:
        layer = Conv1D(base.out_features, base.in_features).to(device=weight_oi.device, dtype=dtype)
        layer.weight.copy_(weight_oi.t())
    else:
        layer = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, dtype=dtype,
                          device=weight_oi.device)
        layer.weight.copy_(weight_oi)
    if base.bias is not None:
        layer.bias.copy_(base.bias)
    return layer.requires_grad_(False)
