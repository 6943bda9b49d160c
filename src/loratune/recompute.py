"""Activations stored for the backward pass as the recipe that makes them, where that recipe is cheap and its
inputs are kept anyway.

A training forward saves some tensors twice over: a gated MLP's product `act(gate) * up` is saved (for the LoRA
on the down projection) beside `gate` and `up`, which the MLP keeps for its own backward; a norm's output is
saved by the LoRA layers it feeds while the norm keeps its input. Where such a tensor is made,
`recompute_when_saved` names it, the function that remakes it and that function's inputs; inside
`recomputing_saves()`, the training loss's context, any autograd node saving it (or a view of it) stores the
recipe instead and runs it when the backward pass asks, once for all the nodes that saved it. Outside that
context, and inside another mechanism's saved-tensor hooks (gradient checkpointing's), everything is saved as
usual.

A registration lives exactly as long as its tensor, so a later tensor at a reused address is never mistaken for
it and the recipe's inputs are not held past it. A tensor changed in place after its registration is saved as
usual. An input changed in place before its recipe runs, or a tensor saved as it is and changed before the
backward pass reads it, is autograd's usual error (saved-tensor hooks turn autograd's own check off, so it is
done here); a tensor saved as its recipe and changed afterwards is remade as it was when saved, which is what
the backward pass needs, where autograd would have refused.
Remade values go through no autograd graph: a second-order backward through them is not supported.
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

AutocastState = tuple[str, bool, torch.dtype]


def autocast_state(device: str) -> AutocastState:
    """The autocast setting in force for `device`, to run a recomputation under the forward's own."""
    return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)


def under(state: AutocastState) -> torch.autocast:
    device, enabled, dtype = state
    return torch.autocast(device, dtype=dtype, enabled=enabled)


class _Source:
    """A registered tensor's recipe. Its value, once remade, is shared by every node that saved the tensor (q, k
    and v's LoRA all save the same normed input) until the last of them lets it go."""

    __slots__ = ("function", "inputs", "versions", "autocast", "layout", "value")

    def __init__(self, function: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...],
                 tensor: torch.Tensor) -> None:
        self.function, self.inputs = function, tuple(t.detach() for t in inputs)
        self.versions = tuple(t._version for t in inputs)
        self.autocast = autocast_state(tensor.device.type)
        self.layout, self.value = (tensor.shape, tensor.dtype), None

    def remade(self) -> torch.Tensor:
        if self.value is None:
            if tuple(t._version for t in self.inputs) != self.versions:
                raise RuntimeError(_MODIFIED)
            with torch.no_grad(), under(self.autocast):
                value = self.function(*self.inputs)
            if (value.shape, value.dtype) != self.layout or not value.is_contiguous():
                raise RuntimeError(f"a recipe remade {tuple(value.shape)} {value.dtype}, not {self.layout}")
            self.value = value
        return self.value


_MODIFIED = ("one of the variables needed for gradient computation has been modified by an inplace operation "
             "(a saved activation or the input of its recipe, loratune.recompute)")
_Registry = dict[int, tuple[weakref.ref, int, _Source]]
_REGISTRY: contextvars.ContextVar[_Registry | None] = contextvars.ContextVar("loratune_recompute", default=None)


def recompute_when_saved(tensor: torch.Tensor, function: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> None:
    """Inside `recomputing_saves()`, store `tensor` for backward as `function(*inputs)`, which must return the
    same values, contiguous, from inputs the graph keeps anyway (detached here); elsewhere do nothing."""
    registry = _REGISTRY.get()
    if registry is None or not torch.is_grad_enabled() or tensor.numel() == 0 or not tensor.is_contiguous():
        return
    storage = tensor.untyped_storage()
    if tensor.storage_offset() != 0 or storage.nbytes() != tensor.numel() * tensor.element_size():
        return  # not the whole of its storage: the recipe would not describe the rest
    key = storage.data_ptr()

    def forget(ref: weakref.ref) -> None:  # the tensor is gone: so is its registration
        if registry.get(key, (None,))[0] is ref:
            del registry[key]

    registry[key] = (weakref.ref(tensor, forget), tensor._version, _Source(function, inputs, tensor))


def recompute_outputs(module: nn.Module) -> bool:
    """Register `module`'s output, whenever it runs on one tensor and no keywords, with the recipe
    `module.forward(input)`: for a module without children whose backward keeps its input (a norm). False if it
    has children or was so already."""
    if any(True for _ in module.children()) or _register_output in module._forward_hooks.values():
        return False
    module.register_forward_hook(_register_output, with_kwargs=True)
    return True


def _register_output(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    if _REGISTRY.get() is None or kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return
    if isinstance(output, torch.Tensor):
        recompute_when_saved(output, module.forward, args[0])


@contextlib.contextmanager
def recomputing_saves() -> Iterator[None]:
    """The context of a training forward in which `recompute_when_saved` takes effect; nothing under no_grad
    (evaluation calls the same loss), where nothing is saved."""
    if not torch.is_grad_enabled():
        yield
        return
    registry: _Registry = {}
    token = _REGISTRY.set(registry)
    try:
        with torch.autograd.graph.saved_tensors_hooks(functools.partial(_pack, registry), _unpack):
            yield
    finally:
        _REGISTRY.reset(token)
        registry.clear()  # every saved tensor's hooks hold `_pack`, so this dict: its recipes must not outlive here


class _Recipe:
    """What a node keeps instead of a registered tensor (or its view): the shared source, and where the view sits."""

    __slots__ = ("source", "shape", "stride", "offset")

    def __init__(self, source: _Source, saved: torch.Tensor) -> None:
        self.source, self.shape, self.stride, self.offset = source, saved.shape, saved.stride(), saved.storage_offset()

    def value(self) -> torch.Tensor:
        return self.source.remade().as_strided(self.shape, self.stride, self.offset)


def _pack(registry: _Registry, saved: torch.Tensor) -> tuple[torch.Tensor, int] | _Recipe:
    # Detached: a node saving its own output hands over a tensor whose grad_fn is that node, and keeping it would
    # be a reference cycle that outlives a graph dropped without a backward pass; unpacking restores the grad_fn.
    kept = (saved.detach(), saved._version)
    if saved.layout is not torch.strided or saved.numel() == 0:
        return kept
    key = saved.untyped_storage().data_ptr()
    entry = registry.get(key)
    if entry is None:
        return kept
    ref, version, source = entry
    owner = ref()
    if owner is None or owner.dtype != saved.dtype or owner.untyped_storage().data_ptr() != key:
        return kept  # gone, or another storage now (`set_`, `resize_`)
    if saved._version != version:  # changed in place since its registration: the recipe would remake the old value
        return kept
    return _Recipe(source, saved)


def _unpack(packed: tuple[torch.Tensor, int] | _Recipe) -> torch.Tensor:
    if isinstance(packed, _Recipe):
        return packed.value()
    tensor, version = packed
    if tensor._version != version:
        raise RuntimeError(_MODIFIED)
    return tensor
