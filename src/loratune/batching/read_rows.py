"""The last decoder layer's MLP computed only where the loss reads.

A causal LM's last layer feeds nothing but the final norm and the output head, and the head runs only at the
positions a label reads (`train.step.head_loss`). Its keys and values are needed everywhere (the read positions
attend to every earlier one), but its MLP, three quarters of a Llama layer's products, acts on each position
alone: at the other positions its output is never read. So inside `only_read_rows(rows)` the last layer's MLP
runs on those rows (flat indices into the body call's batch x length positions) and returns zeros elsewhere:
the hidden states at the read positions, the loss and the gradients are the same, for 1/30 less of a 30-layer
model's products. The rows are given by the caller that knows the body call's layout (`train.step.lm_hidden`,
`shared_prefix.shared_prefix_hidden`); a call of any other shape and a checkpointed body (whose recomputation
runs outside the context) run whole, as does, from its first call on, an MLP that returns anything but one
tensor of its input's positions (a mixture of experts returning its router's scores). An MLP module that the
body uses in more than one place is not hooked. With LoRA dropout the MLP's masks are drawn for the rows it
computes: other draws, the same distribution.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Iterator

import torch
from torch import nn

_ROWS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("loratune_read_rows", default=None)
_GATHERED: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("loratune_gathered", default=None)
_WHOLE: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # MLPs found to return more than one tensor


@contextlib.contextmanager
def only_read_rows(rows: torch.Tensor | None) -> Iterator[None]:
    """The body call inside runs its last MLP on `rows` alone (None: everywhere)."""
    token = _ROWS.set(rows)
    try:
        yield
    finally:
        _ROWS.reset(token)
        _GATHERED.set(None)  # (an MLP that raised keeps no input here)


def last_mlp(body: nn.Module) -> nn.Module | None:
    """The `mlp` of the last layer in the body's list of decoder layers (its longest `ModuleList`), if any."""
    lists = [child for child in body.children() if isinstance(child, nn.ModuleList) and len(child)]
    if not lists:
        return None
    mlp = getattr(max(lists, key=len)[-1], "mlp", None)
    return mlp if isinstance(mlp, nn.Module) else None


def compute_read_rows_only(body: nn.Module) -> bool:
    """Hook the body's last MLP so that `only_read_rows` applies to it; False where there is none, where it
    holds a list of modules (a mixture of experts, which routes and returns more than one tensor) or where it
    is hooked already."""
    mlp = last_mlp(body)
    if mlp is None or _gather in mlp._forward_pre_hooks.values() or \
            any(isinstance(m, nn.ModuleList) for m in mlp.modules()) or \
            sum(m is mlp for m in body.modules(remove_duplicate=False)) > 1:
        return False
    mlp.register_forward_pre_hook(_gather)
    mlp.register_forward_hook(_scatter)
    return True


def _gather(module: nn.Module, args: tuple) -> tuple | None:
    rows = _ROWS.get()
    _GATHERED.set(None)
    if rows is None or module in _WHOLE or len(args) != 1 or not isinstance(args[0], torch.Tensor) or \
            args[0].dim() < 2:
        return None
    x = args[0]
    positions = x.shape[:-1].numel()
    if rows.numel() and int(rows.max()) >= positions:
        return None
    _GATHERED.set(x)
    return (x.reshape(positions, x.shape[-1])[rows][None],)


def _scatter(module: nn.Module, args: tuple, output: object) -> object:
    x = _GATHERED.get()
    if x is None:
        return None
    _GATHERED.set(None)
    rows = _ROWS.get()
    if not isinstance(output, torch.Tensor) or output.shape[:-1] != (1, rows.numel()):
        _WHOLE.add(module)  # not one tensor per position: run whole, now and from now on
        return module.forward(x)
    full = output.new_zeros(x.shape[:-1].numel(), output.shape[-1])
    return full.index_put((rows,), output[0]).view(*x.shape[:-1], output.shape[-1])
