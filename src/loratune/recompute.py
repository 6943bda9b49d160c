"""Activations stored for the backward pass as the recipe that makes them, where that recipe is cheap and its
inputs are kept anyway.

A training forward saves some tensors twice over: a gated MLP's product `act(gate) * up` is saved (for the LoRA
on the down projection) beside `gate` and `up`, which the MLP keeps for its own backward; the shared-prefix
blocks' attention output is saved (for the LoRA on the output projection) beside the SDPA outputs it is copied
from. Where such a tensor is made, `recompute_when_saved` names it and how to remake it; inside
`recomputing_saves()`, the training forward's context, any autograd node saving it (or a view of it) stores
the recipe instead and runs it when the backward pass asks (one elementwise pass or copy). Outside that
context, and inside another mechanism's saved-tensor hooks (gradient checkpointing's), everything is saved as
usual.

A registration lives as long as the tensor's Python object: a node saves the recipe only while that object is
alive, so a later tensor at a reused address can never be mistaken for it. Recomputed values go through no
autograd graph: a second-order backward through them is not supported.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


class _Source:
    """A registered tensor's recipe; its value, once remade, is shared by every node that saved the tensor (q,
    k and v's LoRA all save the same normed input) until the last of them lets it go."""

    __slots__ = ("recompute", "autocast", "value", "__weakref__")

    def __init__(self, recompute: Callable[[], torch.Tensor], autocast: tuple) -> None:
        self.recompute, self.autocast, self.value = recompute, autocast, None

    def remade(self) -> torch.Tensor:
        if self.value is None:
            device, enabled, dtype = self.autocast
            with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                self.value = self.recompute()
        return self.value


_Registry = dict[int, tuple[weakref.ref, _Source]]
_REGISTRY: contextvars.ContextVar[_Registry | None] = contextvars.ContextVar("loratune_recompute", default=None)


def recompute_when_saved(tensor: torch.Tensor, recompute: Callable[[], torch.Tensor]) -> None:
    """Inside `recomputing_saves()`, store `tensor` for backward as `recompute` (which must return the same
    values, contiguous, from tensors the graph keeps anyway); elsewhere do nothing."""
    registry = _REGISTRY.get()
    if registry is None or not torch.is_grad_enabled() or tensor.numel() == 0:
        return
    if not tensor.is_contiguous() or tensor.storage_offset() != 0:
        return  # a view into a larger storage: the recipe would not describe that storage
    device = tensor.device.type
    autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
    registry[tensor.untyped_storage().data_ptr()] = (weakref.ref(tensor), _Source(recompute, autocast))


def recompute_outputs(module: nn.Module) -> bool:
    """Register `module`'s output, whenever it runs, with the recipe `module.forward(input)`: for a module
    called with one input that its own backward keeps (a norm). False if it was so already."""
    if _register_output in module._forward_hooks.values():
        return False
    module.register_forward_hook(_register_output)
    return True


def _register_output(module: nn.Module, args: tuple, output: Any) -> None:
    if _REGISTRY.get() is not None and len(args) == 1 and isinstance(output, torch.Tensor):
        source = args[0].detach()
        recompute_when_saved(output, lambda: module.forward(source))


@contextlib.contextmanager
def recomputing_saves() -> Iterator[None]:
    """The context of a training forward in which `recompute_when_saved` takes effect."""
    registry: _Registry = {}
    token = _REGISTRY.set(registry)
    try:
        with torch.autograd.graph.saved_tensors_hooks(functools.partial(_pack, registry), _unpack):
            yield
    finally:
        _REGISTRY.reset(token)
        registry.clear()  # every saved tensor's hooks hold `_pack`, so this dict: its recipes must not outlive here


class _Recipe:
    __slots__ = ("source", "shape", "stride", "offset")

    def __init__(self, source: _Source, saved: torch.Tensor) -> None:
        self.source, self.shape, self.stride, self.offset = source, saved.shape, saved.stride(), saved.storage_offset()

    def value(self) -> torch.Tensor:
        return self.source.remade().as_strided(self.shape, self.stride, self.offset)


def _pack(registry: _Registry, saved: torch.Tensor) -> torch.Tensor | _Recipe:
    if saved.layout is not torch.strided or saved.numel() == 0:
        return saved
    key = saved.untyped_storage().data_ptr()
    entry = registry.get(key)
    if entry is None:
        return saved
    owner = entry[0]()
    if owner is None:  # the registered tensor is gone: its address may now hold another tensor
        del registry[key]
        return saved
    if owner.dtype != saved.dtype or owner.untyped_storage().data_ptr() != key:
        return saved
    return _Recipe(entry[1], saved)


def _unpack(packed: torch.Tensor | _Recipe) -> torch.Tensor:
    return packed.value() if isinstance(packed, _Recipe) else packed
