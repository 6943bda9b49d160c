"""Less kept for the backward pass: what a training forward saves and what it remakes instead.

- **Gated MLPs** (`down(act(gate(x)) * up(x))`, Llama's and most recent families'). Autograd saves the
  activation's input `gate(x)`, its output `act(gate(x))`, `up(x)` and (for the LoRA on the down projection) the
  product; each is `intermediate_size` wide, the widest activations of a layer. `GatedProduct` saves `gate(x)`
  and `up(x)` only and recomputes `act(gate(x))` in the backward pass, and the product is kept as its recipe
  (`loratune.recompute`): one elementwise pass each over tensors the backward reads anyway.
- **Norms** (childless modules named `...Norm`, without running statistics). Their output is what the next
  attention's or MLP's LoRA layers save as their input, while the norm keeps its own input for its backward:
  the output is kept as the recipe `norm(input)` where a node saves it as it is (not under autocast, whose LoRA
  layers save a bf16 copy).

Values and gradients are the same operations on the same inputs, so bit for bit those of the unpatched model
(tested); the demo's saved activations per step: 447 MB, 385 MB with `GatedProduct`, and with the recipes
(these and the shared-prefix attention's) 245 MB (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from loratune.recompute import autocast_state, recompute_outputs, recompute_when_saved, under

#: The forward body this patch replaces, whitespace removed: a class whose forward differs is left alone.
_GATED_FORWARD = ("down_proj=self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))returndown_proj",
                  "returnself.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))")


class Activated:
    """`act(gate)` where the product's recipe remade it in this backward pass (the down projection's LoRA
    backward runs just before `GatedProduct`'s), so `GatedProduct` need not compute it a third time."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def product(self, act: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        self.value = act(gate)
        return self.value * up

    def take(self) -> torch.Tensor | None:
        value, self.value = self.value, None
        return value


class GatedProduct(torch.autograd.Function):
    """`act(gate) * up`, saving `gate` and `up` only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act: nn.Module,
                activated: Activated | None = None) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.act, ctx.autocast = act, autocast_state(gate.device.type)  # the backward recomputes under it
        ctx.activated = activated
        return act(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        remade = ctx.activated.take() if ctx.activated is not None else None
        if _is_silu(ctx.act):  # aten's fused derivative, as autograd's own SiluBackward computes it
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
            activated = remade if remade is not None else F.silu(gate)
            return grad_gate, grad * activated if ctx.needs_input_grad[1] else None, None, None
        with torch.enable_grad(), under(ctx.autocast):
            leaf = gate.detach().requires_grad_()
            activated = ctx.act(leaf)
        grad_gate = torch.autograd.grad(activated, leaf, grad * up)[0] if ctx.needs_input_grad[0] else None
        return grad_gate, grad * activated.detach() if ctx.needs_input_grad[1] else None, None, None


def _is_silu(act: nn.Module) -> bool:
    return type(act) is nn.SiLU or type(act).__name__ == "SiLUActivation"  # torch's, transformers' (F.silu)


def _gated_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up, act, activated = self.gate_proj(x), self.up_proj(x), self.act_fn, Activated()
    product = GatedProduct.apply(gate, up, act, activated)
    # what down's LoRA would keep; remade, `act(gate)` waits there for GatedProduct's backward
    recompute_when_saved(product, functools.partial(activated.product, act), gate, up)
    return self.down_proj(product)


@functools.cache
def _is_plain_gated(cls: type) -> bool:
    """Whether `cls.forward` is exactly the gated product (read from its source, once per class)."""
    try:
        lines = inspect.getsource(cls.forward).splitlines()
    except (OSError, TypeError):
        return False
    body = "".join("".join(line.split()) for line in lines[1:] if not line.strip().startswith("#"))
    return body in _GATED_FORWARD


class SavedLess(NamedTuple):
    gated_mlps: int
    norms: int


def save_less(model: nn.Module) -> SavedLess:
    """Route every plain gated MLP of `model` through `GatedProduct` and keep its norms' outputs as their
    recipes (in place); returns how many of each changed. Only the instances change: their class, and other
    models of it, are left as they were. An activation with parameters of its own (PReLU) is left alone:
    `GatedProduct` gives it no gradient; so is a norm with running statistics (batch norms), whose forward
    changes its state."""
    norms = sum(recompute_outputs(module) for module in model.modules()
                if type(module).__name__.endswith("Norm") and not hasattr(module, "running_mean"))
    return SavedLess(_route_gated_mlps(model), norms)


def _route_gated_mlps(model: nn.Module) -> int:
    patched = 0
    for module in model.modules():
        parts = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")]
        plain = "forward" not in vars(module) and _is_plain_gated(type(module))
        if plain and all(isinstance(part, nn.Module) for part in parts) and not any(parts[-1].parameters()):
            module.forward = functools.partial(_gated_forward, module)  # (a partial pickles; a bound method not)
            patched += 1
    return patched
