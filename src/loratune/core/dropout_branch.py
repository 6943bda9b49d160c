"""The LoRA branch under dropout, `scaling * B(A(dropout(x)))`, as one autograd function.

Plain autograd keeps, per adapted layer, the dropped-out copy of the input (for A's gradient) and the
mask; q, k and v read the same input yet keep three copies. This function keeps the input itself, which
layers reading the same tensor share, plus a one-byte mask, and rebuilds the dropped-out input in
backward. The mask comes from 16-bit slices of 64-bit random integers: measured on a 1M-element tensor
(2-CPU x86, torch 2.13), 1.6 ms against 6.4 ms for `bernoulli_` and 10.7 ms for `F.dropout`.

Semantics are standard inverted dropout, each layer with its own mask, with the drop probability rounded
to a multiple of 1/65536 (|error| <= 7.7e-6) and kept values scaled by 1/(1 - that probability), so the
expected input is unchanged.
"""

from __future__ import annotations

import torch
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


class _DropoutBranch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor, keep_scale: float,
                scaling: float) -> torch.Tensor:
        dtype = _compute_dtype(x, a)
        x_in = x.to(dtype)  # x itself when already in `dtype`, so layers reading one input share what they save
        with torch.autocast(x.device.type, enabled=False):  # the keep scale rides on the r-wide product
            su = (torch.where(keep, x_in, 0) @ a.to(dtype).t()) * (keep_scale * scaling)
            out = su @ b.to(dtype).t()
        ctx.save_for_backward(x_in, keep, a, b, su)
        ctx.keep_scale, ctx.scaling, ctx.dtype, ctx.input_dtype = keep_scale, scaling, dtype, x.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, keep, a, b, su = ctx.saved_tensors
        dtype, keep_scale = ctx.dtype, ctx.keep_scale
        g = grad_out.to(dtype).reshape(-1, grad_out.shape[-1])
        grad_b = (g.t() @ su.reshape(-1, su.shape[-1])).to(b.dtype) if ctx.needs_input_grad[2] else None
        g_u = (g @ b.to(dtype)) * (ctx.scaling * keep_scale)  # d loss / d (mask * x) @ A^T
        grad_a = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_a = (g_u.t() @ torch.where(keep, x, 0).reshape(-1, x.shape[-1])).to(a.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = torch.where(keep, (g_u @ a.to(dtype)).reshape(x.shape), 0).to(ctx.input_dtype)
        return grad_x, grad_a, grad_b, None, None, None


def dropout_branch(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, p: float, scaling: float,
                   keep: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """`scaling * (dropout(x) @ A^T) @ B^T` with dropout probability `p`; `keep` = (mask, scale) fixes the
    mask (for tests), else one is drawn with `keep_mask`."""
    mask, keep_scale = keep if keep is not None else keep_mask(x.shape, p, x.device)
    return _DropoutBranch.apply(x, a, b, mask, keep_scale, scaling)
