"""The LoRA branch, `scaling * B(A(dropout(x)))`, as one autograd function.

Two things autograd's own graph of two `F.linear` calls does worse:

- **Layouts.** The factors are thin (r is 8-64), and a BLAS computes a thin product far faster in one layout
  than another: the gradient of B as `((A x) @ grad)^T` with `A x` kept as (r, tokens) rather than
  `grad^T @ (A x)`, and the gradient of the r-wide intermediate as `B^T @ grad^T` rather than `grad @ B`,
  measured 4x and 2.7x faster for 340 tokens and a 1536-wide output (2-core AVX2 CPU, fp32, MKL). So the
  intermediate is kept as (r, tokens) and every product is taken in the layout that is fast (docs/benchmarks.md:
  forward and backward 0.42-1.00x autograd's time by shape, a demo step 0.97x).
- **Dropout.** Autograd keeps, per adapted layer, the dropped-out copy of the input (for A's gradient) and the
  mask; q, k and v read the same input yet keep three copies. This function keeps the input itself, which
  layers reading the same tensor share, plus a one-byte mask, and rebuilds the dropped-out input in backward.
  The mask comes from 16-bit slices of 64-bit random integers: measured on a 1M-element tensor (2-CPU x86,
  torch 2.13), 1.6 ms against 6.4 ms for `bernoulli_` and 10.7 ms for `F.dropout`.

A frozen linear layer with one adapter runs as one node with its branch (`lora_linear`, chosen by
`LoraLinear` where `fusable` says it computes the same): the branch's input gradient is then added into the
base's in place instead of autograd summing two fresh tensors, and the thin products run while their operands
are in cache; the demo's forward and backward measured 0.967x the two-node time (docs/benchmarks.md). Layers
that read one input run as one node together (`shared_input`).

Dropout is standard inverted dropout, each layer with its own mask, with the drop probability rounded to a
multiple of 1/65536 (|error| <= 7.7e-6) and kept values scaled by 1/(1 - that probability), so the expected
input is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

_LEVELS = 1 << 16


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """(mask of kept positions, the scale kept values get), drawn from torch's generator for `device`."""
    drop_levels = min(round(p * _LEVELS), _LEVELS - 1)
    count = shape.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)  # all 64 bits
    lanes = words.view(torch.int16)[:count].view(shape)
    keep = lanes >= drop_levels - (1 << 15)  # lanes are uniform on [-2^15, 2^15)
    return keep, _LEVELS / (_LEVELS - drop_levels)


def _compute_dtype(x: torch.Tensor, a: torch.Tensor) -> torch.dtype:
    """Under autocast the matmuls run in autocast's dtype; otherwise in the adapter's (fp32 by default)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return a.dtype


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # (a cast to its own dtype still costs a dispatch)


def _rows(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The (dropped-out) input as a (tokens, in) matrix."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if keep is None else torch.where(keep.reshape(rows.shape), rows, 0)


class _LoraBranch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, result: torch.Tensor | None, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                keep: torch.Tensor | None, keep_scale: float, scaling: float) -> torch.Tensor:
        dtype = _compute_dtype(x, a)
        x_in = _as(x, dtype)  # x itself when already in `dtype`, so layers reading one input share what they save
        if torch.is_autocast_enabled(x.device.type):  # the scales ride on the r-wide intermediate, in `dtype`
            with torch.autocast(x.device.type, enabled=False):
                out, su_t = _forward(result, x_in, _as(a, dtype), _as(b, dtype), keep, keep_scale * scaling)
        else:
            out, su_t = _forward(result, x_in, _as(a, dtype), _as(b, dtype), keep, keep_scale * scaling)
        if result is not None:
            ctx.mark_dirty(result)
        ctx.save_for_backward(x_in, keep, a, b, su_t)
        ctx.scale, ctx.dtype, ctx.input_dtype = keep_scale * scaling, dtype, x.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, keep, a, b, su_t = ctx.saved_tensors
        dtype, needs = ctx.dtype, ctx.needs_input_grad
        g = _as(grad_out, dtype).reshape(-1, grad_out.shape[-1])
        grad_b = _as((su_t @ g).t(), b.dtype) if needs[3] else None
        gu_t = torch.mm(_as(b, dtype).t(), g.t()).mul_(ctx.scale)  # d loss / d (dropped-out x @ A^T), (r, tokens)
        grad_a = _as(gu_t @ _rows(x, keep), a.dtype) if needs[2] else None
        grad_x = None
        if needs[1]:
            grad_x = (gu_t.t() @ _as(a, dtype)).reshape(x.shape)
            grad_x = _as(grad_x if keep is None else torch.where(keep, grad_x, 0), ctx.input_dtype)
        return grad_out if needs[0] else None, grad_x, grad_a, grad_b, None, None, None


class _LoraLinear(torch.autograd.Function):
    """A frozen linear layer and its LoRA branch as one node: `x W^T + bias + scale * (A x)^T B^T`.

    One node instead of two lets the backward pass add the branch's input gradient into the base's in place
    (`addmm_`) instead of autograd summing two fresh tensors, and take the thin products while the output
    gradient is still in cache."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, keep: torch.Tensor | None, scale: float, transposed: bool) -> torch.Tensor:
        su_t = torch.mm(a, _rows(x, keep).t()).mul_(scale)  # while x is in cache
        out, flat = frozen_product(x, weight, bias, transposed)
        flat.addmm_(su_t.t(), b.t())
        ctx.save_for_backward(x, keep, weight, a, b, su_t)
        ctx.scale, ctx.transposed = scale, transposed
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, keep, weight, a, b, su_t = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_b = (su_t @ g).t() if needs[4] else None
        gu_t = torch.mm(b.t(), g.t()).mul_(ctx.scale)  # d loss / d (dropped-out x @ A^T), (r, tokens)
        grad_x = None
        if needs[0]:
            grad_x = torch.mm(g, weight.t() if ctx.transposed else weight)
            if keep is None:
                grad_x.addmm_(gu_t.t(), a)
            else:
                grad_x.add_(torch.where(keep.reshape(grad_x.shape), gu_t.t() @ a, 0))
            grad_x = grad_x.view(x.shape)
        grad_a = gu_t @ _rows(x, keep) if needs[3] else None
        return grad_x, None, None, grad_a, grad_b, None, None, None


def frozen_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x W^T + bias, the same as a (tokens, out) view): a tensor of its own, not a view of the product's 2-D
    result, since a view made inside an autograd function may not be changed in place (an in-place ReLU)."""
    w = weight if transposed else weight.t()
    out = x.new_empty(*x.shape[:-1], w.shape[1])
    flat, rows = out.view(-1, w.shape[1]), x.reshape(-1, x.shape[-1])
    if bias is None:
        torch.mm(rows, w, out=flat)
    else:
        torch.addmm(bias, rows, w, out=flat)
    return out, flat


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scaling: float, p: float = 0.0, keep: tuple[torch.Tensor, float] | None = None,
                transposed: bool = False) -> torch.Tensor:
    """`x W^T + bias + lora_branch(x, a, b, scaling, p, keep)` for a frozen `weight` (out, in), or (in, out)
    `transposed`, and bias, all in x's dtype, outside autocast (`fusable` says when)."""
    mask, keep_scale = _mask(x, p, keep)
    return _LoraLinear.apply(x, weight, bias, a, b, mask, keep_scale * scaling, transposed)


def fusable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
            b: torch.Tensor) -> bool:
    """Whether `lora_linear` computes this layer: a frozen plain weight and bias (not a tensor subclass, whose
    own product a plain one would bypass) and factors, all in x's dtype and on its device, autocast off."""
    plain = (torch.Tensor, nn.Parameter)
    return (x.dtype == weight.dtype == a.dtype == b.dtype and x.device == weight.device == a.device == b.device
            and type(weight) in plain and not weight.requires_grad
            and (bias is None or (bias.dtype == x.dtype and type(bias) in plain and not bias.requires_grad))
            and not torch.is_autocast_enabled(x.device.type))


def _forward(result: torch.Tensor | None, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
             keep: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, scale * A x as (r, tokens)): into `result` in place where given (one pass over the output
    instead of three)."""
    su_t = torch.mm(a, _rows(x, keep).t()).mul_(scale)
    if result is not None:
        result.view(-1, result.shape[-1]).addmm_(su_t.t(), b.t())
        return result, su_t
    return (su_t.t() @ b.t()).reshape(*x.shape[:-1], b.shape[0]), su_t


def _mask(x: torch.Tensor, p: float, keep: tuple[torch.Tensor, float] | None) -> tuple[torch.Tensor | None, float]:
    if keep is None and p > 0:
        keep = keep_mask(x.shape, p, x.device)
    return keep if keep is not None else (None, 1.0)


def lora_branch(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, p: float = 0.0,
                keep: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """`scaling * (dropout(x) @ A^T) @ B^T`, computed in the adapter's dtype (or autocast's), with dropout
    probability `p` (0: none); `keep` = (mask, scale) fixes the mask (for tests), else one is drawn with
    `keep_mask`."""
    return _LoraBranch.apply(None, x, a, b, *_mask(x, p, keep), scaling)


def add_lora_branch(result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                    p: float = 0.0, keep: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """`result + lora_branch(...)`, added into `result` in place where it is a contiguous tensor of the
    branch's dtype (a layer's fresh output), else out of place."""
    if result.is_contiguous() and result.dtype == _compute_dtype(x, a) and result._base is None:
        return _LoraBranch.apply(result, x, a, b, *_mask(x, p, keep), scaling)
    return result + lora_branch(x, a, b, scaling, p, keep).to(result.dtype)
