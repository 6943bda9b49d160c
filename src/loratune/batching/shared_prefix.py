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
batch; `fallback_warning` says so once per run, as it does under gradient checkpointing, which leaves no cache
to share: there a training batch runs as one row when it fits (below), else padded.

The attention's concatenation of prefix and remainder keys materializes the broadcast keys per row (a
few hundred values per token and layer); the prefix's matrix products, which dominate, run once.

Where the prefix and all the remainders fit in `ONE_ROW_TOKENS`, they run instead as one row of one forward
(the prefix, then every remainder, each attending to the prefix and to its own earlier tokens): no cache,
and half the operator calls of two forwards, which at a few hundred tokens cost more than anything the one
row adds. Under eager or SDPA attention the row's attention runs block by block through a function
registered with transformers (`BLOCK_ATTENTION`, the model's own eager attention or `_grouped_sdpa` called
on the prefix and on each packed row), so that it computes the blocks the mask lets through, not the
row's square, and eager's weights take the two-forward layout's memory. On the demo's batches (about 300 tokens
in that row) a training step's forward and backward took 0.76x the two-forward layout's time, its peak memory
within 6 MiB of that layout's (docs/benchmarks.md, "One forward per shared-prefix batch").
"""

from __future__ import annotations

import contextvars
import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from loratune.batching.batches import BatchMaker, first_fit_rows
from loratune.batching.kv_cache import prefix_cache
from loratune.batching.read_rows import only_read_rows
from loratune.recompute import recompute_when_saved

ALIBI_MODEL_TYPES = ("bloom", "mpt")  # always ALiBi; Falcon says so in `config.alibi`
#: The most tokens (prefix and every remainder) a shared-prefix batch runs as one row of one forward
ONE_ROW_TOKENS = 512
BLOCK_ATTENTION = "loratune_one_row_blocks"  # registered with transformers on first use


def decoder_body(model: nn.Module) -> nn.Module | None:
    """The decoder body under a transformers LM's output head (its `base_model_prefix` attribute; inside a
    PEFT wrapper, its model's), or None where there is no separate body: the one lookup behind training's
    loss, evaluation, label scoring and the server, so all share a prefix with the same module."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    body = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    return body if isinstance(body, nn.Module) and body is not model else None


def max_positions(model: Any) -> int | None:
    """How many tokens the model's (or a config's) position embeddings allow, when its config says: the longest
    row a training batch, a prompt or the one row of a shared-prefix batch may have (some families size buffers
    by it)."""
    config = getattr(model, "config", model)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def shared_prefix_hidden(body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         prefix: int, read: torch.Tensor | None = None) -> torch.Tensor:
    """The body's last hidden states (B, L, H) for a right-padded batch whose rows share their first
    `prefix` tokens, with the prefix computed once and, where the attention takes a custom mask, the rows'
    remainders packed: behind the prefix in one row when all of it fits (`one_row_limit`), else into as few
    rows as the longest remainder allows, run against the prefix's cache (under gradient checkpointing, which
    keeps no cache, the batch as it is). `read` (B, L): where the caller reads the output, so that the one
    row's last MLP runs there alone (`read_rows`)."""
    rows = input_ids.shape[0]
    remainders = (attention_mask.sum(1) - prefix).tolist()
    one_row = prefix + sum(remainders)
    layers_checkpointed = checkpointed(body)
    if one_row <= one_row_limit(body.config) and packed_mask_obstacle(body.config, one_row) is None:
        return _one_row_hidden(body, input_ids, prefix, remainders, blocks=not layers_checkpointed,
                               read=None if layers_checkpointed else read)
    if layers_checkpointed:  # a checkpointed layer keeps no cache to run the remainders against: the rows as they are
        return body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    packed = None
    if packed_mask_obstacle(body.config, prefix + max(remainders)) is None:
        packed = pack_remainders(input_ids[:, prefix:], remainders, prefix)
        ids, positions = packed.ids, packed.positions
        mask = packed.mask(prefix, *_mask_format(body))
    else:  # the rows' remainders as they are, right-padded, positions from the mask
        ids, mask, positions = input_ids[:, prefix:], attention_mask, None
    head_hidden, cache = prefix_cache(body, input_ids[:1, :prefix], ids.shape[0])
    with cache.prefix_only():
        rest = body(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True).last_hidden_state
    if packed is not None:  # back to one row per example
        rest = packed.unpack(rest, rows)
    return torch.cat([head_hidden.expand(rows, -1, -1), rest], dim=1)


def checkpointed(body: nn.Module) -> bool:
    """Whether the body's layers run checkpointed, as transformers decides it: in training mode, with or without
    gradients. `gradient_checkpointing_enable` sets the flag on every module that has one, so the first such
    module (the body itself, or its first layer) answers without a walk over every module each step."""
    flag = next((m.gradient_checkpointing for m in body.modules() if hasattr(m, "gradient_checkpointing")), False)
    return body.training and bool(flag)


def _one_row_hidden(body: nn.Module, input_ids: torch.Tensor, prefix: int, remainders: list[int],
                    blocks: bool = True, read: torch.Tensor | None = None) -> torch.Tensor:
    """The prefix and every row's remainder in one row of one forward: each remainder token attends to the
    prefix and its own remainder's earlier tokens. One forward instead of two (the prefix's, then the rest's
    against its cache) halves the step's operator calls, which at a few hundred tokens cost more than the
    gathers this needs. Under eager or SDPA attention and with `blocks` the attention itself runs block by
    block (`_block_attention`): it computes what the mask lets through, about a fifth of the row's square on
    the demo's batches, and eager's weights take no more memory than the two-forward layout's. Under gradient
    checkpointing (`blocks` False) it attends over the full row: a layer's recomputation in the backward pass
    runs outside this call, with the model's own attention, and must save what the forward saved; a
    checkpointed layer keeps the row's square only while that layer's backward runs."""
    rows = input_ids.shape[0]
    rest_ids = input_ids[:, prefix:]
    one = pack_remainders(rest_ids, remainders, prefix, width=sum(remainders))
    device = input_ids.device
    ids = torch.cat([input_ids[:1, :prefix], one.ids], dim=1)
    positions = torch.cat([torch.arange(prefix, device=device)[None], one.positions], dim=1)
    mask = one.mask(prefix, *_mask_format(body), prefix_rows=True)
    attend = _block_function(body) if blocks else None
    with only_read_rows(None if read is None else _row_positions(read, one, prefix)):
        hidden = _one_row_body(body, ids, mask, positions, attend, rest_ids, remainders, prefix, one)
    return torch.cat([hidden[:, :prefix].expand(rows, -1, -1), one.unpack(hidden[:, prefix:], rows)], dim=1)


def _row_positions(read: torch.Tensor, one: PackedRemainders, prefix: int) -> torch.Tensor:
    """The one row's positions holding the batch positions `read` marks: the prefix's own, then the packed
    remainders' slots."""
    in_row = torch.cat([torch.arange(prefix, device=read.device).expand(read.shape[0], -1), prefix + one.slots],
                       dim=1)
    return in_row[:, :read.shape[1]][read].unique()


def _one_row_body(body: nn.Module, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                  attend: Callable | None, rest_ids: torch.Tensor, remainders: list[int], prefix: int,
                  one: PackedRemainders) -> torch.Tensor:
    config = body.config
    implementation = config._attn_implementation
    if attend is None:
        hidden = body(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
    else:
        _register_block_attention()
        groups = 1
        if attend is _grouped_sdpa:
            groups = config.num_attention_heads // (getattr(config, "num_key_value_heads", None) or
                                                    config.num_attention_heads)
        token = _BLOCKS.set(_blocks(rest_ids, remainders, prefix, one, mask, attend, groups))
        config._attn_implementation_internal = BLOCK_ATTENTION
        try:
            hidden = body(input_ids=ids, attention_mask=mask, position_ids=positions,
                          use_cache=False).last_hidden_state
        finally:
            config._attn_implementation_internal = implementation
            _BLOCKS.reset(token)
    return hidden


def _block_function(body: nn.Module) -> Callable | None:
    """The attention `_block_attention` calls per block: the family's module-level eager function, or
    `_grouped_sdpa`. None (the full row under its mask) for other implementations, for a family without a
    module-level eager function (a sign its attention does not go through transformers' attention functions,
    so it would not call ours), and for GPT-2 upcasting its scores to fp32 in its own eager path."""
    implementation = body.config._attn_implementation
    eager = getattr(sys.modules[type(body).__module__], "eager_attention_forward", None)
    if eager is None:
        return None
    if implementation == "sdpa":
        return _grouped_sdpa
    if implementation != "eager" or getattr(body.config, "reorder_and_upcast_attn", False):
        return None
    return eager


@dataclass
class _Blocks:
    """How one row's attention splits: the prefix's causal block, then the remainders packed as the
    two-forward layout packs them (`pack_remainders`), each packed row against the prefix and itself."""

    prefix: int
    source: torch.Tensor  # (packed rows, width): the one row's remainder token each packed slot holds (padding: 0)
    order: torch.Tensor  # the packed slot of each of the one row's remainder tokens, in the row's order
    prefix_mask: torch.Tensor
    rest_mask: torch.Tensor
    attend: Callable  # transformers' attention signature: (module, query, key, value, mask, **kwargs)


_BLOCKS: contextvars.ContextVar[_Blocks | None] = contextvars.ContextVar("loratune_one_row_blocks", default=None)


def _blocks(rest_ids: torch.Tensor, lengths: list[int], prefix: int, one: PackedRemainders, mask: torch.Tensor,
            attend: Callable, groups: int = 1) -> _Blocks:
    """The one row's split (`mask` is its mask, boolean or additive: the prefix's causal block is its corner),
    each block's mask repeated `groups` times along its queries for `_grouped_sdpa`."""
    device = rest_ids.device
    packed = pack_remainders(rest_ids, lengths, prefix)
    valid = torch.arange(rest_ids.shape[1], device=device)[None] < torch.tensor(lengths, device=device)[:, None]
    in_row, in_packed = one.slots[valid], packed.slots[valid]
    source = torch.zeros(packed.ids.numel(), dtype=torch.long, device=device)
    source[in_packed] = in_row
    order = torch.empty_like(in_row)
    order[in_row] = in_packed
    rest_mask = packed.mask(prefix, mask.dtype == torch.bool, mask.dtype)
    return _Blocks(prefix, source.view(packed.ids.shape), order, mask[:, :, :prefix, :prefix].repeat(1, 1, groups, 1),
                   rest_mask.repeat(1, 1, groups, 1), attend)


def _block_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The model's attention over the one row, in blocks: the prefix causally, then each packed row of
    remainders against the prefix's keys and its own. The same result as the full row under its mask, for the
    blocks' work instead of the whole row's square (and, under eager, weights of the blocks' size)."""
    blocks = _BLOCKS.get()
    if blocks is None:  # not inside `_one_row_hidden`
        raise RuntimeError(f"{BLOCK_ATTENTION} attention runs only inside a shared-prefix batch's forward")
    p, attend = blocks.prefix, blocks.attend
    head, _ = attend(module, query[:, :, :p], key[:, :, :p], value[:, :, :p], blocks.prefix_mask, **kwargs)
    rows = blocks.source.shape[0]

    def packed(t: torch.Tensor) -> torch.Tensor:  # (1, heads, row, dim) -> (packed rows, heads, width, dim)
        return t[0, :, p:][:, blocks.source].transpose(0, 1)

    def with_prefix(t: torch.Tensor) -> torch.Tensor:  # (packed rows, kv heads, prefix + width, dim)
        return torch.cat([t[:, :, :p].expand(rows, -1, -1, -1), packed(t)], dim=2)

    keys, values = with_prefix(key), with_prefix(value)
    recompute = attend is _grouped_sdpa  # SDPA keeps the prefix's keys, values and outputs: the rest is remade
    if recompute:  # the packed rows' keys and values, copies of the prefix's and of the row's own
        recompute_when_saved(keys, with_prefix, key)
        recompute_when_saved(values, with_prefix, value)
    rest, _ = attend(module, packed(query), keys, values, blocks.rest_mask, **kwargs)  # (rows, width, heads..., dim)
    output = _row_output(head, rest, blocks.order)
    if recompute:  # the output projection's LoRA saves its input, a copy of SDPA's outputs
        recompute_when_saved(output, lambda head, rest: _row_output(head, rest, blocks.order), head, rest)
    return output, None


def _row_output(head: torch.Tensor, rest: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(1, row, heads, dim): the prefix block's output, then the packed rows' outputs in the row's order (the
    blocks' outputs as (rows, length, heads, dim), or as `_grouped_sdpa` gives them)."""
    width, dim = rest.shape[1], rest.shape[-1]
    picked = rest[order // width, order % width]  # (remainder tokens, heads..., dim), one copy
    return torch.cat([head.reshape(1, head.shape[1], -1, dim), picked.reshape(1, picked.shape[0], -1, dim)], dim=1)


def _grouped_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor, dropout: float = 0.0, scaling: float | None = None,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA with the query heads that share a key/value head folded into its query rows, so keys and values
    are neither repeated per query head nor saved so for the backward pass (transformers' SDPA function
    repeats them where the mask rules out torch's own grouping). The same products; on the demo's blocks
    0.6-0.75x the time of the repeated form, a third of its keys and values kept. Its output's heads are two
    axes, (key/value head, query head within it), which `_row_output` merges."""
    for unsupported in ("softcap", "position_bias"):  # transformers' SDPA function refuses one, adds the other
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"{BLOCK_ATTENTION}: SDPA blocks do not take {unsupported}; use eager attention")
    rows, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    folded = query.reshape(rows, key.shape[1], groups * length, dim)  # head h reads key/value head h // groups
    if attention_mask.shape[-2] != groups * length:  # `_blocks` folds the one row's masks once for all layers
        attention_mask = attention_mask.repeat(1, 1, groups, 1)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling)
    # (rows, length, kv heads, groups, dim): a view of SDPA's output whatever its memory layout (a GPU kernel's
    # may be (rows, length, heads, dim)), so what `_row_output` remakes the attention output from is kept anyway
    return out.unflatten(2, (groups, length)).permute(0, 3, 1, 2, 4), None


def _mask_format(body: nn.Module) -> tuple[bool, torch.dtype]:
    """(boolean, dtype) of our masks for `body`'s attention. SDPA's is boolean off the CPU; else additive like
    eager's, in the embeddings' dtype, or under autocast SDPA's queries' dtype. On the CPU torch's SDPA kernel
    turns a boolean mask (or one of another dtype) into a float one on every call and keeps each layer's copy
    for the backward pass (13 MB per demo step); a float mask in the queries' dtype is one tensor every layer
    shares."""
    embeddings = body.get_input_embeddings().weight
    device, sdpa = embeddings.device.type, body.config._attn_implementation == "sdpa"
    if sdpa and device != "cpu":
        return True, embeddings.dtype
    if sdpa and torch.is_autocast_enabled(device):
        return False, torch.get_autocast_dtype(device)
    return False, embeddings.dtype


def one_row_limit(config: Any) -> int:
    """The most tokens the one row of a shared-prefix batch may hold: `ONE_ROW_TOKENS`, or fewer where the
    model's positions or its sliding window are shorter."""
    return min(ONE_ROW_TOKENS, max_positions(config) or ONE_ROW_TOKENS, _sliding_window(config) or ONE_ROW_TOKENS)


def _sliding_window(config: Any) -> int | None:
    window = getattr(config, "sliding_window", None)
    return window if window is not None and getattr(config, "use_sliding_window", True) else None


def packed_mask_obstacle(config: Any, length: int) -> str | None:
    """Why a 4D mask of our own would not reach the attention unchanged or would mean something else for rows
    of `length` tokens (None: it would not): FlashAttention takes none, a sliding window shorter than the rows
    cuts it, and ALiBi models build their biases from a 2D mask instead of position ids. The server asks the
    same of its 2D masks with padding inside a row (between a shared prefix and each row's rest), which the
    same three would misread."""
    implementation = getattr(config, "_attn_implementation", None)
    window = _sliding_window(config)
    if implementation not in ("eager", "sdpa"):
        return f"{implementation} attention takes no custom mask"
    if getattr(config, "alibi", False) or getattr(config, "model_type", None) in ALIBI_MODEL_TYPES:
        return "ALiBi biases are built from a 2D mask"
    if window is not None and length > window:
        return f"rows longer than the sliding window of {window} tokens"
    return None


def fallback_warning(batches: BatchMaker, config: Any, max_length: int) -> str | None:
    """One line naming what runs instead where `train.batching` cannot apply as asked to this model, or None."""
    if batches.batching != "shared_prefix" or batches.task != "causal-lm":
        return None
    found = []
    if batches.strategy(training=True) != batches.batching:
        found.append(f"training batches run {batches.strategy(training=True)} under FSDP (each rank's batch would "
                     "make its own number of body forwards; evaluation still shares the prefix)")
    elif batches.checkpointing:
        which = "every training batch runs" if packed_mask_obstacle(config, 1) is not None else \
            f"training batches over {one_row_limit(config)} tokens (the prefix and every row's remainder) run"
        found.append(f"under gradient checkpointing, {which} padded (a checkpointed layer keeps no cache; "
                     "evaluation still shares the prefix)")
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

    def mask(self, prefix: int, boolean: bool, dtype: torch.dtype, prefix_rows: bool = False) -> torch.Tensor:
        """(rows, 1, width, prefix + width): every token sees the prefix and its own row's earlier tokens;
        True where attended (SDPA), or 0 there and the dtype's minimum elsewhere (eager adds it). With
        `prefix_rows`, the prefix's own causal rows come first: (1, 1, prefix + width, prefix + width), for
        the prefix and one packed row in one sequence."""
        seg, pos = self.segments, self.positions
        own = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0) & (pos[:, :, None] >= pos[:, None, :])
        seen = torch.cat([own.new_ones(*own.shape[:2], prefix), own], dim=2)
        if prefix_rows:
            causal = torch.ones(prefix, prefix, dtype=torch.bool, device=own.device).tril()
            head = torch.cat([causal, own.new_zeros(prefix, own.shape[2])], dim=1)
            seen = torch.cat([head[None], seen], dim=1)
        seen = seen[:, None]
        if boolean:
            return seen
        return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(~seen, torch.finfo(dtype).min)

    def unpack(self, packed_hidden: torch.Tensor, rows: int) -> torch.Tensor:
        """(rows, L - prefix, H): the packed rows' hidden states back in their batch rows (padding reads slot 0)."""
        flat = packed_hidden.reshape(-1, packed_hidden.shape[-1])
        return flat[self.slots.flatten()].view(rows, -1, packed_hidden.shape[-1])


def pack_remainders(rest_ids: torch.Tensor, lengths: Sequence[int], prefix: int,
                    width: int | None = None) -> PackedRemainders:
    """Pack each row's first `lengths[b]` tokens of `rest_ids` (B, L - prefix) into rows of `width` (default
    the longest: no packed row then attends over more keys than the padded batch's rows).

    The index tensors are built on the CPU and moved once; the token ids are gathered on `rest_ids`' device."""
    width = width or max(lengths)
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



@functools.cache
def _register_block_attention() -> None:
    """Registered on first use, not at import: transformers' modeling module costs seconds to import, and a
    model that reaches here has loaded it already."""
    from transformers import AttentionInterface

    AttentionInterface.register(BLOCK_ATTENTION, _block_attention)
