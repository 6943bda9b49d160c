"""Shared-prefix batches: the tokens every row of a batch starts with are computed once, at batch 1.

Templated data repeats the same start in every example (a chat template's system turn and an
instruction). The body runs that common prefix once, its keys and values are broadcast over the batch
(`expand`, no copy of the computation), and the rows' remaining tokens run against them as against a
generation cache. Autograd sums every row's gradient into the one prefix computation, so with LoRA
dropout off the loss and the adapter gradients equal the plain batch's (within fp32 rounding). With
dropout on, the prefix draws one dropout mask and every row it serves shares it, where a plain batch
draws a mask per row: the same expectation, slightly more correlated noise.

The rows' remainders after the prefix are packed one after another into as few rows as the longest
remainder allows (first fit, longest first), each token attending to the prefix and to its own row's
earlier tokens through a 4D mask, so less compute goes to the padding of rows of unequal length (the
demo's first 12 batches: 28% of the padded remainder slots are padding, 18% of the packed ones). Where a
custom mask cannot reach the attention unchanged or would mean something else (FlashAttention, a sliding
window shorter than the rows, ALiBi biases built from the mask) the remainders run padded, as rows of the
batch.

The attention's concatenation of prefix and remainder keys materializes the broadcast keys per row (a
few hundred values per token and layer); the prefix's matrix products, which dominate, run once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from loratune.data.packing import first_fit_rows

MIN_PREFIX = 8  # below this, the second forward call costs more than the prefix saves
ALIBI_MODEL_TYPES = ("bloom", "mpt")  # always ALiBi; Falcon says so in `config.alibi`


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
    `prefix` tokens, with the prefix computed once and, where the attention takes a custom mask, the rows'
    remainders packed into fewer rows."""
    rows = input_ids.shape[0]
    remainders = (attention_mask.sum(1) - prefix).tolist()
    packed = None
    if _takes_packed_mask(body.config, prefix + max(remainders)):
        packed = pack_remainders(input_ids[:, prefix:], remainders, prefix)
        ids, positions = packed.ids, packed.positions
        mask = packed.mask(prefix, body.config._attn_implementation == "sdpa", body.get_input_embeddings().weight.dtype)
    else:  # the rows' remainders as they are, right-padded, positions from the mask
        ids, mask, positions = input_ids[:, prefix:], attention_mask, None
    head_hidden, cache = prefix_cache(body, input_ids[:1, :prefix], ids.shape[0])
    with prefix_only(cache):
        rest = body(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True).last_hidden_state
    if packed is not None:  # back to one row per example
        rest = rest.reshape(-1, rest.shape[-1])[packed.slots.flatten()].view(rows, -1, rest.shape[-1])
    return torch.cat([head_hidden.expand(rows, -1, -1), rest], dim=1)


def _takes_packed_mask(config: Any, length: int) -> bool:
    """Whether a 4D mask of our own reaches the attention unchanged and means the same: eager or SDPA attention
    (FlashAttention takes none), no sliding window shorter than the sequences, and positions from position
    ids (ALiBi models build their biases from a 2D mask)."""
    window = getattr(config, "sliding_window", None)
    windowed = window is not None and getattr(config, "use_sliding_window", True) and length > window
    alibi = getattr(config, "alibi", False) or getattr(config, "model_type", None) in ALIBI_MODEL_TYPES
    return getattr(config, "_attn_implementation", None) in ("eager", "sdpa") and not windowed and not alibi


@dataclass
class PackedRemainders:
    """The rows' tokens after the shared prefix, laid one after another in as few rows as the longest allows.

    `segments` says which batch row each slot holds (-1: padding), `positions` its position in that row, and
    `slots` (B, L - prefix) where each remainder token sits in the packed rows, flattened (0 for padding)."""

    ids: torch.Tensor
    positions: torch.Tensor
    segments: torch.Tensor
    slots: torch.Tensor

    def mask(self, prefix: int, boolean: bool, dtype: torch.dtype) -> torch.Tensor:
        """(rows, 1, width, prefix + width): every token sees the prefix and its own row's earlier tokens;
        True where attended (SDPA), or 0 there and the dtype's minimum elsewhere (eager adds it)."""
        seg, pos = self.segments, self.positions
        own = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0) & (pos[:, :, None] >= pos[:, None, :])
        seen = torch.cat([own.new_ones(*own.shape[:2], prefix), own], dim=2)[:, None]
        if boolean:
            return seen
        return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(~seen, torch.finfo(dtype).min)


def pack_remainders(rest_ids: torch.Tensor, lengths: Sequence[int], prefix: int) -> PackedRemainders:
    """Pack each row's first `lengths[b]` tokens of `rest_ids` (B, L - prefix) into rows of the longest.

    The index tensors are built on the CPU and moved once; the token ids are gathered on `rest_ids`' device."""
    width = max(lengths)  # no packed row attends over more keys than the padded batch's rows
    bins = first_fit_rows(lengths, width)
    shape, row_width = (len(bins), width), rest_ids.shape[1]
    source = torch.zeros(shape, dtype=torch.long)  # flat index into rest_ids; padding reads token 0, unread
    positions = torch.full(shape, prefix, dtype=torch.long)
    segments = torch.full(shape, -1, dtype=torch.long)
    slots = torch.zeros(rest_ids.shape, dtype=torch.long)
    for r, members in enumerate(bins):
        start = 0
        for b in members:
            n = lengths[b]
            span = torch.arange(n)
            source[r, start:start + n] = b * row_width + span
            positions[r, start:start + n] = prefix + span
            segments[r, start:start + n] = b
            slots[b, :n] = r * width + start + span
            start += n
    device = rest_ids.device
    ids = rest_ids.reshape(-1)[source.to(device)]
    return PackedRemainders(ids, positions.to(device), segments.to(device), slots.to(device))


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
