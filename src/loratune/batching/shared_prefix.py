"""Shared-prefix batches: the tokens every row of a batch starts with are computed once, at batch 1.

Templated data repeats the same start in every example (a chat template's system turn and an
instruction). The body runs that common prefix once (`kv_cache.prefix_cache`), its keys and values are
broadcast over the batch (no copy of the computation), and the rows' remaining tokens run against them as
against a generation cache. Autograd sums every row's gradient into the one prefix computation, so with
LoRA dropout off the loss and the adapter gradients equal the plain batch's (within fp32 rounding). With
dropout on, the prefix draws one dropout mask and every row it serves shares it, where a plain batch draws a
mask per row: the same expectation, slightly more correlated noise.

The rows' remainders after the prefix are packed one after another into as few rows as the longest
remainder allows (`batches.first_fit_rows`), each token attending to the prefix and to its own row's
earlier tokens through a 4D mask, so less compute goes to the padding of rows of unequal length (the
demo's first 12 batches: 28% of the padded remainder slots are padding, 18% of the packed ones). Where a
custom mask cannot reach the attention unchanged or would mean something else (FlashAttention, a sliding
window shorter than the rows, ALiBi biases built from the mask) the remainders run padded, as rows of the
batch; `fallback_warning` says so once per run, as it does when gradient checkpointing leaves no cache to
share and training batches run padded.

The attention's concatenation of prefix and remainder keys materializes the broadcast keys per row (a
few hundred values per token and layer); the prefix's matrix products, which dominate, run once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loratune.batching.batches import BatchMaker, first_fit_rows
from loratune.batching.kv_cache import prefix_cache

ALIBI_MODEL_TYPES = ("bloom", "mpt")  # always ALiBi; Falcon says so in `config.alibi`


def decoder_body(model: nn.Module) -> nn.Module | None:
    """The decoder body under a transformers LM's output head (its `base_model_prefix` attribute; inside a
    PEFT wrapper, its model's), or None where there is no separate body: the one lookup behind training's
    loss, evaluation, label scoring and the server, so all share a prefix with the same module."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    body = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    return body if isinstance(body, nn.Module) and body is not model else None


def shared_prefix_hidden(body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         prefix: int) -> torch.Tensor:
    """The body's last hidden states (B, L, H) for a right-padded batch whose rows share their first
    `prefix` tokens, with the prefix computed once and, where the attention takes a custom mask, the rows'
    remainders packed into fewer rows."""
    rows = input_ids.shape[0]
    remainders = (attention_mask.sum(1) - prefix).tolist()
    packed = None
    if packed_mask_obstacle(body.config, prefix + max(remainders)) is None:
        packed = pack_remainders(input_ids[:, prefix:], remainders, prefix)
        ids, positions = packed.ids, packed.positions
        mask = packed.mask(prefix, body.config._attn_implementation == "sdpa", body.get_input_embeddings().weight.dtype)
    else:  # the rows' remainders as they are, right-padded, positions from the mask
        ids, mask, positions = input_ids[:, prefix:], attention_mask, None
    head_hidden, cache = prefix_cache(body, input_ids[:1, :prefix], ids.shape[0])
    with cache.prefix_only():
        rest = body(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True).last_hidden_state
    if packed is not None:  # back to one row per example
        rest = rest.reshape(-1, rest.shape[-1])[packed.slots.flatten()].view(rows, -1, rest.shape[-1])
    return torch.cat([head_hidden.expand(rows, -1, -1), rest], dim=1)


def packed_mask_obstacle(config: Any, length: int) -> str | None:
    """Why a 4D mask of our own would not reach the attention unchanged or would mean something else for rows
    of `length` tokens (None: it would not): FlashAttention takes none, a sliding window shorter than the rows
    cuts it, and ALiBi models build their biases from a 2D mask instead of position ids. The server asks the
    same of its 2D masks with padding inside a row (between a shared prefix and each row's rest), which the
    same three would misread."""
    implementation = getattr(config, "_attn_implementation", None)
    window = getattr(config, "sliding_window", None)
    if implementation not in ("eager", "sdpa"):
        return f"{implementation} attention takes no custom mask"
    if getattr(config, "alibi", False) or getattr(config, "model_type", None) in ALIBI_MODEL_TYPES:
        return "ALiBi biases are built from a 2D mask"
    if window is not None and getattr(config, "use_sliding_window", True) and length > window:
        return f"rows longer than the sliding window of {window} tokens"
    return None


def fallback_warning(batches: BatchMaker, config: Any, max_length: int) -> str | None:
    """One line naming what runs instead where `train.batching` cannot apply as asked to this model, or None."""
    if batches.batching != "shared_prefix" or batches.task != "causal-lm":
        return None
    found = []
    if batches.strategy(training=True) != batches.batching:
        found.append(f"training batches run {batches.strategy(training=True)} under gradient checkpointing (a "
                     "checkpointed layer keeps no cache; evaluation still shares the prefix)")
    obstacle = packed_mask_obstacle(config, max_length)
    if obstacle is not None:
        found.append(f"the rows' remainders after the prefix run padded, not packed ({obstacle})")
    return "train.batching: shared_prefix: " + "; ".join(found) if found else None


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
