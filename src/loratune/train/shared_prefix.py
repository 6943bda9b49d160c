"""Shared-prefix batches: the tokens every row of a batch starts with are computed once, at batch 1.

Templated data repeats the same start in every example (a chat template's system turn and an
instruction). The body runs that common prefix once, its keys and values are broadcast over the batch
(`expand`, no copy of the computation), and the rows' remaining tokens run against them as against a
generation cache. Autograd sums every row's gradient into the one prefix computation, so with LoRA
dropout off the loss and the adapter gradients equal the plain batch's (within fp32 rounding). With
dropout on, the prefix draws one dropout mask and every row it serves shares it, where a plain batch
draws a mask per row: the same expectation, slightly more correlated noise.

The attention's concatenation of prefix and remainder keys materializes the broadcast keys per row (a
few hundred values per token and layer); the prefix's matrix products, which dominate, run once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_PREFIX = 8  # below this, the second forward call costs more than the prefix saves


def common_prefix_length(rows: Sequence[Sequence[int]], lengths: Sequence[int] | None = None) -> int:
    """Length of the longest common prefix of `rows` (each cut to its length), leaving every row at least
    one token of its own, so each row has a remainder that carries its last hidden state."""
    lengths = list(lengths) if lengths is not None else [len(r) for r in rows]
    limit = min(lengths) - 1
    if len(rows) < 2 or limit <= 0:
        return 0
    first = rows[0]
    for i in range(limit):
        token = first[i]
        if any(row[i] != token for row in rows[1:]):
            return i
    return limit


def batch_prefix_length(batch: dict[str, torch.Tensor]) -> int:
    """The common prefix of a right-padded batch's real tokens (0 when it is too short to pay off)."""
    ids = batch["input_ids"]
    if "position_ids" in batch or ids.shape[0] < 2:
        return 0
    lengths = batch["attention_mask"].sum(1)
    limit = int(lengths.min()) - 1
    if limit < MIN_PREFIX or not bool((batch["attention_mask"][:, :limit] == 1).all()):
        return 0
    same = (ids[:, :limit] == ids[:1, :limit]).all(0)
    length = int(same.long().cumprod(0).sum())
    return length if length >= MIN_PREFIX else 0


def prefix_cache(body: nn.Module, prefix: torch.Tensor, rows: int) -> tuple[torch.Tensor, DynamicCache]:
    """(hidden states of `prefix` (1, P, H), a cache holding its keys and values broadcast to `rows`)."""
    cache = DynamicCache(config=body.config)
    hidden = body(input_ids=prefix, past_key_values=cache, use_cache=True).last_hidden_state
    for layer in cache.layers:
        layer.keys = layer.keys.expand(rows, *layer.keys.shape[1:])
        layer.values = layer.values.expand(rows, *layer.values.shape[1:])
    return hidden, cache


def shared_prefix_hidden(body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         prefix: int) -> torch.Tensor:
    """The body's last hidden states (B, L, H) for a right-padded batch whose rows share their first
    `prefix` tokens, with the prefix computed once."""
    rows = input_ids.shape[0]
    head_hidden, cache = prefix_cache(body, input_ids[:1, :prefix], rows)
    with prefix_only(cache):
        rest = body(input_ids=input_ids[:, prefix:], attention_mask=attention_mask, past_key_values=cache,
                    use_cache=True).last_hidden_state
    return torch.cat([head_hidden.expand(rows, -1, -1), rest], dim=1)


@contextmanager
def prefix_only(cache: DynamicCache) -> Iterator[None]:
    """Within this block `cache` gives each layer the prefix's keys and values joined with the new tokens' but
    keeps only the prefix's: without gradients each layer's joined keys and values are freed once that layer is
    done, instead of all layers' living until the forward ends (the demo's evaluation: 30 layers x 32 rows x
    ~130 tokens, 0.2 GB); in training autograd keeps them anyway. Layers of other kinds (sliding windows) keep
    storing."""
    plain = [layer for layer in cache.layers if type(layer) is DynamicLayer]

    def joined(layer: DynamicLayer) -> Callable:
        def update(keys: torch.Tensor, values: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
            if not layer.is_initialized:
                return keys, values
            return torch.cat([layer.keys, keys], dim=-2), torch.cat([layer.values, values], dim=-2)
        return update

    for layer in plain:
        layer.update = joined(layer)
    try:
        yield
    finally:
        for layer in plain:
            del layer.update
