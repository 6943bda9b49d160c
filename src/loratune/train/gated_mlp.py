"""A gated MLP (`down(act(gate(x)) * up(x))`, Llama's and most recent families') that keeps two of its four
intermediates for the backward pass instead of four.

Autograd saves the activation's input `gate(x)`, its output `act(gate(x))`, `up(x)` and (for the LoRA on the
down projection) the product; each is `intermediate_size` wide, the widest activations of a layer. `GatedProduct`
saves `gate(x)` and `up(x)` only and recomputes `act(gate(x))` in the backward pass, one elementwise pass over
a tensor the backward reads anyway. Forward values and gradients are the same operations on the same inputs,
so bit for bit those of the unpatched module (tested); the demo's saved activations go from 447 to 385 MB per
step (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn
from torch.nn import functional as F

#: The forward body this patch replaces, whitespace removed: a class whose forward differs is left alone.
_GATED_FORWARD = ("down_proj=self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))returndown_proj",
                  "returnself.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))")


class GatedProduct(torch.autograd.Function):
    """`act(gate) * up`, saving `gate` and `up` only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act: nn.Module) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        device = gate.device.type  # the backward pass recomputes under the forward's autocast, if any
        ctx.act, ctx.autocast = act, (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return act(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        if _is_silu(ctx.act):  # aten's fused derivative, as autograd's own SiluBackward computes it
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
            return grad_gate, grad * F.silu(gate) if ctx.needs_input_grad[1] else None, None
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            leaf = gate.detach().requires_grad_()
            activated = ctx.act(leaf)
        grad_gate = torch.autograd.grad(activated, leaf, grad * up)[0] if ctx.needs_input_grad[0] else None
        return grad_gate, grad * activated.detach() if ctx.needs_input_grad[1] else None, None


def _is_silu(act: nn.Module) -> bool:
    return type(act) is nn.SiLU or type(act).__name__ == "SiLUActivation"  # torch's, transformers' (F.silu)


def _gated_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(GatedProduct.apply(self.gate_proj(x), self.up_proj(x), self.act_fn))


@functools.cache
def _is_plain_gated(cls: type) -> bool:
    """Whether `cls.forward` is exactly the gated product (read from its source, once per class)."""
    try:
        lines = inspect.getsource(cls.forward).splitlines()
    except (OSError, TypeError):
        return False
    body = "".join("".join(line.split()) for line in lines[1:] if not line.strip().startswith("#"))
    return body in _GATED_FORWARD


def save_less_in_gated_mlps(model: nn.Module) -> int:
    """Route every plain gated MLP of `model` through `GatedProduct` (in place); returns how many. Only the
    instances change: their class, and other models of it, are left as they were. An activation with
    parameters of its own (PReLU) is left alone: `GatedProduct` gives it no gradient."""
    patched = 0
    for module in model.modules():
        parts = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")]
        plain = "forward" not in vars(module) and _is_plain_gated(type(module))
        if plain and all(isinstance(part, nn.Module) for part in parts) and not any(parts[-1].parameters()):
            module.forward = functools.partial(_gated_forward, module)  # (a partial pickles; a bound method not)
            patched += 1
    return patched
