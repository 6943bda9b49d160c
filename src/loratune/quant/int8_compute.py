"""int8 compute for a frozen base, in the manner of SwitchBack (Wortsman et al. 2023): the two matrix
products a frozen linear layer costs per step, y = x W^T in forward and dx = dy W in backward (a frozen
weight takes no gradient), run as int8 x int8 products with int32 accumulation (`torch._int_mm`).

The weight is quantized once, per output channel (the int8 storage of `quant.storage`); activations and
output gradients are quantized per token (row-wise absmax) on each call. For the input gradient the
weight's per-channel scales are folded into the output gradient before it is quantized, so
dy W = (dy * s_w) Q_w is the same product the dequantized weight would give, up to rounding.
"""

from __future__ import annotations

import torch

_CUDA_MIN_ROWS = 17  # CUDA's int8 kernel needs more than 16 rows


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, float32 scale per row) of a 2-D tensor, absmax per row mapped to 127."""
    x = x.float()
    scale = x.abs().amax(dim=1).clamp_min(1e-12) / 127
    return torch.round(x / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def int8_matmul(a: torch.Tensor, a_scale: torch.Tensor, b_t: torch.Tensor, b_scale: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
    """(a_scale[:, None] * a) @ b_t (* b_scale[None, :]) in `dtype`, from int8 a (m, k) and b_t (k, n)."""
    rows = a.shape[0]
    if a.is_cuda and rows < _CUDA_MIN_ROWS:
        a = torch.cat([a, a.new_zeros(_CUDA_MIN_ROWS - rows, a.shape[1])])
    out = torch._int_mm(a, b_t)[:rows].float().mul_(a_scale[:, None])
    if b_scale is not None:
        out.mul_(b_scale[None, :])
    return out.to(dtype)


class Int8Linear(torch.autograd.Function):
    """y = x @ W^T for a frozen int8 weight (out, in) with per-output-channel `scales`; x and the gradient of
    y are quantized per token. Only x takes a gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(codes, scales)
        ctx.in_dtype = x.dtype
        flat = x.reshape(-1, x.shape[-1])
        codes_x, scale_x = quantize_rows(flat)
        out = int8_matmul(codes_x, scale_x, codes.t(), scales, x.dtype)
        return out.view(*x.shape[:-1], codes.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        codes, scales = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1]).float() * scales[None, :]
        codes_g, scale_g = quantize_rows(flat)
        grad_x = int8_matmul(codes_g, scale_g, codes, None, ctx.in_dtype)
        return grad_x.view(*grad.shape[:-1], codes.shape[1]), None, None
