"""Frozen linear weights kept in 16 bits while the products run in fp32.

A CPU without native bf16 products (AVX2) trains fastest in fp32, but fp32 frozen weights take twice the
memory of the bf16 checkpoints most models ship as. A `WidenedLinear` keeps its weight as stored (bf16 or
fp16) and widens it into a reused fp32 buffer for each product, forward and backward: the products see
exactly the fp32 values an fp32 load would give, and autograd saves nothing of the widened copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loratune.core.adapters import set_module
from loratune.quant.convert import quantizable_layers
from loratune.quant.linear import workspace

NARROW_DTYPES = (torch.bfloat16, torch.float16)


def _widened(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` in `dtype`, written into this thread's reused buffer: valid until the next call."""
    buffer = workspace().get("widened", weight.numel(), dtype, weight.device)
    return buffer.view(weight.shape).copy_(weight)


class _WidenedMatmul(torch.autograd.Function):
    """y = x @ W.T with W widened to x's dtype in forward and again in backward (W takes no gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)  # the stored 16-bit weight itself: no new memory
        return F.linear(x, _widened(weight, x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        return grad @ _widened(weight, grad.dtype), None


class WidenedLinear(nn.Linear):
    """A frozen `nn.Linear` whose weight stays in 16 bits; an input of a wider dtype gets a product in its
    own dtype. Under autocast, or with an input of the weight's dtype, it is a plain `nn.Linear`."""

    @classmethod
    def from_linear(cls, layer: nn.Linear, compute_dtype: torch.dtype) -> WidenedLinear:
        """The same weight tensor (not copied), the bias cast to `compute_dtype`."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = layer.in_features, layer.out_features
        new.weight = nn.Parameter(layer.weight.detach(), requires_grad=False)
        bias = layer.bias
        new.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        new.train(layer.training)
        return new

    def as_trainable(self) -> nn.Linear:
        """A plain `nn.Linear` copy in the bias's (the compute) dtype, for `core.adapters.trainable_copy`: a
        widened product gives its weight no gradient, and AdamW needs full-precision weights."""
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=dtype)
        with torch.no_grad():
            plain.weight.copy_(self.weight)
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if x.dtype == self.weight.dtype or torch.is_autocast_enabled(x.device.type):
            return F.linear(x, self.weight, bias)
        out = _WidenedMatmul.apply(x, self.weight)
        return out if bias is None else out + bias


def widenable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers `widen_frozen_base` widens, by path: the frozen body layers quantization would store
    (`quant.convert.quantizable_layers`: no output heads) that are `nn.Linear`s (not transformers' `Conv1D`,
    which stays in the compute dtype), except those the model keeps in fp32 (transformers'
    `_keep_in_fp32_modules`: T5's `wo`, whose input the model casts to its weight's dtype). For the memory
    estimate too."""
    kept = set(getattr(model, "_keep_in_fp32_modules", None) or []) | \
        set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return {path: layer for path, layer in quantizable_layers(model).items()
            if type(getattr(layer, "base_layer", layer)) in (nn.Linear, WidenedLinear)
            and not kept & set(path.split("."))}


def widen_frozen_base(model: nn.Module, compute_dtype: torch.dtype = torch.float32) -> int:
    """Turn a model loaded in 16 bits into one that computes in `compute_dtype`: its `widenable_layers` keep
    their 16-bit weights as `WidenedLinear`s; every other parameter and buffer is cast to `compute_dtype`.
    Returns how many layers were widened."""
    widened = 0
    for path, layer in widenable_layers(model).items():
        if type(layer) is nn.Linear and layer.weight.dtype in NARROW_DTYPES:  # not yet widened, not adapted
            set_module(model, path, WidenedLinear.from_linear(layer, compute_dtype))
            widened += 1
    kept = {id(m.weight) for m in model.modules() if isinstance(m, WidenedLinear)}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) not in kept and param.is_floating_point() and param.dtype != compute_dtype:
                param.data = param.data.to(compute_dtype)
        for key, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and buffer.dtype != compute_dtype:
                module._buffers[key] = buffer.to(compute_dtype)
    return widened


def widened_dtype(model: nn.Module) -> torch.dtype | None:
    """The 16-bit dtype `model`'s widened layers keep, or None when it has none (for the run's report)."""
    return next((m.weight.dtype for m in model.modules() if isinstance(m, WidenedLinear)), None)
