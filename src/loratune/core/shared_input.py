"""LoRA layers that read the same input, run as one node: a transformer's query, key and value projections,
or a gated MLP's gate and up projections.

Each layer alone (`lora_branch.lora_linear`) reads its input once for its A product and again for A's
gradient, and autograd sums the layers' input gradients from fresh tensors. Run together, the layers' A factors
are stacked, so one product reads the input for all of them and one for all their gradients, and the input
gradient is one tensor that every frozen product and the stacked A add into in place.

Which layers share an input is learned from the calls, not from names, in an explicit learning pass
(`learning_shared_inputs`, which a training run makes on one example before its first step, fresh or resumed):
layers run alone one after another on the same tensor, under the same parent module, form a group. Groups change
only there: under gradient checkpointing a layer's forward runs again in the backward pass and must save what it
saved the first time. The member called first when the group was learned computes every member and keeps the
others' outputs until each is called with that same tensor (`SharedInput.take`); a member called with another
tensor runs alone, and outputs left untaken are dropped when the group runs again. Dropout breaks the sharing
(each layer draws its own mask): with dropout active the members run alone. Groups live in a weak registry, not
on the layers: a model pickles, copies and is freed as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from loratune.core.lora_branch import frozen_product


class _LoraLinears(torch.autograd.Function):
    """`x W_i^T + bias_i + scale_i * (A_i x)^T B_i^T` for each member i, from one input `x`.

    After `x`: the scales and the transposed flags (one per member), then per member its weight, bias, A and B."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scales: tuple[float, ...], transposed: tuple[bool, ...],
                *tensors: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        weights, biases, a, b = tensors[0::4], tensors[1::4], tensors[2::4], tensors[3::4]
        ranks = [t.shape[0] for t in a]
        su_t = torch.mm(torch.cat(a), x.reshape(-1, x.shape[-1]).t())  # every member's A x, (sum of ranks, tokens)
        outs = []
        for w, bias, part, b_i, scale, t in zip(weights, biases, su_t.split(ranks), b, scales, transposed,
                                                strict=True):
            part.mul_(scale)
            out, flat = frozen_product(x, w, bias, t)
            flat.addmm_(part.t(), b_i.t())
            outs.append(out)
        ctx.save_for_backward(x, su_t, *weights, *a, *b)
        ctx.ranks, ctx.scales, ctx.transposed = ranks, scales, transposed
        ctx.set_materialize_grads(False)  # an output no loss reads: None, not zeros to multiply
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outs: torch.Tensor | None):
        x, su_t, *saved = ctx.saved_tensors
        n = len(ctx.ranks)
        weights, a, b = saved[:n], saved[n:2 * n], saved[2 * n:]
        needs = ctx.needs_input_grad
        gu_t = torch.zeros_like(su_t)  # d loss / d (A x), stacked like su_t; zero where no loss reads an output
        grad_a: list[torch.Tensor | None] = [None] * n
        grad_b: list[torch.Tensor | None] = [None] * n
        grad_x = None
        for i, (g, part, gu) in enumerate(zip(grad_outs, su_t.split(ctx.ranks), gu_t.split(ctx.ranks), strict=True)):
            if g is None:
                continue
            g = g.reshape(-1, g.shape[-1])
            if needs[6 + 4 * i]:
                grad_b[i] = (part @ g).t()
            torch.mm(b[i].t(), g.t(), out=gu).mul_(ctx.scales[i])
            if needs[0]:
                w = weights[i].t() if ctx.transposed[i] else weights[i]
                grad_x = torch.mm(g, w) if grad_x is None else grad_x.addmm_(g, w)
        if grad_x is not None:
            grad_x = grad_x.addmm_(gu_t.t(), torch.cat(a)).view(x.shape)
        if any(needs[5 + 4 * i] and grad_outs[i] is not None for i in range(n)):
            grad_a = [g_a if g is not None else None
                      for g_a, g in zip((gu_t @ x.reshape(-1, x.shape[-1])).split(ctx.ranks), grad_outs, strict=True)]
        grads: list[torch.Tensor | None] = [grad_x, None, None]
        for i in range(n):
            grads += [None, None, grad_a[i], grad_b[i]]
        return tuple(grads)


class SharedInput:
    """A group of LoRA layers (`LoraLinear`) that read one input tensor; see the module's docstring. Members are
    held weakly."""

    def __init__(self, members: list[Any]) -> None:
        self._members = [weakref.ref(m) for m in members]
        self._input: weakref.ref | None = None
        self._version = -1
        self._grad = False
        self._waiting: dict[int, torch.Tensor] = {}  # id(member) -> its output, kept for its call

    @property
    def members(self) -> list[Any]:
        return [m for m in (ref() for ref in self._members) if m is not None]

    def take(self, member: Any, x: torch.Tensor) -> torch.Tensor | None:
        """`member`'s output kept from the group's last run, where that run was on `x` (same tensor, unchanged,
        same grad mode), else None."""
        kept = self._waiting.pop(id(member), None)
        if kept is not None and self._input is not None and self._input() is x and x._version == self._version \
                and torch.is_grad_enabled() == self._grad:
            return kept
        return None

    def kept(self) -> bool:
        """Whether outputs of the last run still wait for their members."""
        return bool(self._waiting)

    def run(self, member: Any, x: torch.Tensor, members: list[Any], parts: list[tuple]) -> torch.Tensor:
        """Run `members` (this group's) on `x` (`parts`: each one's weight, bias, A, B, scale and transposed
        flag); return `member`'s output and keep the others' (dropping what an earlier run left untaken)."""
        weights_etc = [t for w, bias, a, b, _, _ in parts for t in (w, bias, a, b)]
        outs = _LoraLinears.apply(x, tuple(p[4] for p in parts), tuple(p[5] for p in parts), *weights_etc)
        self._input, self._version, self._grad = weakref.ref(x), x._version, torch.is_grad_enabled()
        self._waiting = {id(m): out for m, out in zip(members, outs, strict=True) if m is not member}
        return outs[members.index(member)]


_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> its SharedInput


def group_of(layer: Any) -> SharedInput | None:
    """The group `layer` runs in, if any."""
    return _GROUPS.get(layer)


def shares(x: torch.Tensor) -> bool:
    """Whether a call on `x` may run or teach a group: not while torch.compile traces (a graph keeps no state
    between calls), not on an inference tensor (it has no version to check)."""
    return not torch.compiler.is_compiling() and not x.is_inference()  # (is_inference stops a trace)


class _Calls:
    """A learning pass: each module's parent, and the layers run alone, one after another, on the current
    input tensor."""

    def __init__(self, model: nn.Module) -> None:
        self.parents = {id(child): parent for parent in model.modules() for child in parent.children()}
        self.input: weakref.ref | None = None
        self.version = -1
        self.members: list[Any] = []

    def close(self) -> None:
        """Group the layers of the current run, if more than one under one parent."""
        members = self.members
        if len(members) > 1 and all(m not in _GROUPS for m in members):
            group = SharedInput(members)
            for m in members:
                _GROUPS[m] = group
        self.input, self.version, self.members = None, -1, []


_LEARNING: contextvars.ContextVar[_Calls | None] = contextvars.ContextVar("loratune_shared_input", default=None)


@contextlib.contextmanager
def learning_shared_inputs(model: nn.Module) -> Iterator[None]:
    """Within: `model`'s LoRA layers that run alone one after another on one tensor, under one parent, become a
    group (see the module's docstring). Run one forward of the model inside, as training or evaluation runs it."""
    calls = _Calls(model)
    token = _LEARNING.set(calls)
    try:
        yield
    finally:
        _LEARNING.reset(token)
        calls.close()


def observe(member: Any, x: torch.Tensor) -> None:
    """Inside a learning pass, record that `member` ran alone on `x`."""
    calls = _LEARNING.get()
    if calls is None or member in _GROUPS:
        return
    if calls.input is not None and calls.input() is x and x._version == calls.version \
            and calls.parents.get(id(member)) is calls.parents.get(id(calls.members[0])):
        if member not in calls.members:
            calls.members.append(member)
        return
    calls.close()
    calls.input, calls.version, calls.members = weakref.ref(x), x._version, [member]
