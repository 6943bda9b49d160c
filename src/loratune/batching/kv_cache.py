"""Every use of transformers' key/value caches in loratune, in one place, through `DynamicCache`.

- `prefix_cache` is the one builder of a shared prefix's cache: the prefix runs once, at batch 1, and its
  keys and values are broadcast to the batch's rows (a view, no copy per row). Training and the evaluation
  loss (`shared_prefix.shared_prefix_hidden`), label scoring and evaluation generation all start from it.
- `SharedPrefixCache.prefix_only`: while the rows' own tokens run, each layer gets the prefix's keys and
  values joined with theirs but keeps only the prefix's. Without gradients each layer's joined keys and
  values are then freed once that layer is done, instead of all layers' living until the forward ends (the
  demo's evaluation: 30 layers x 32 rows x ~130 tokens, 0.2 GB); in training autograd keeps them anyway.
  Layers of other kinds (sliding windows) keep storing.
- `stack_rows` and `keep_rows`: the server's shared cache gains a prefilled row or loses finished ones; the
  result is a new `DynamicCache` built from the tensors through its constructor. `padding_first` moves the
  padding of a prefill that ran after a shared prefix to the front of each row, where the server keeps it.

The one write below transformers' public methods is `SharedPrefixCache.broadcast`, which replaces each
layer's batch-1 keys and values by a broadcast view of themselves (`Cache.batch_repeat_interleave` would copy
them once per row). tests/batching/test_kv_cache.py runs every function here against transformers' caches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class SharedPrefixCache(DynamicCache):
    """A `DynamicCache` (one layer per the config's layer types) that can broadcast a batch-1 prefix to its
    rows and, within `prefix_only`, keep the prefix alone in its full-attention layers."""

    def __init__(self, config: Any) -> None:
        super().__init__(config=config)
        self.keep_new = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if self.keep_new or type(layer) is not DynamicLayer:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if not layer.is_initialized:
            return key_states, value_states
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)

    def broadcast(self, rows: int) -> None:
        """Each layer's keys and values (batch 1) seen as `rows` rows, without copying them."""
        for layer in self.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
                layer.keys = layer.keys.expand(rows, *layer.keys.shape[1:])
                layer.values = layer.values.expand(rows, *layer.values.shape[1:])

    @contextmanager
    def prefix_only(self) -> Iterator[None]:
        """Within this block the full-attention layers return the new tokens' keys and values joined with the
        prefix's but store nothing."""
        self.keep_new = False
        try:
            yield
        finally:
            self.keep_new = True


def prefix_cache(body: nn.Module, prefix_ids: torch.Tensor, rows: int) -> tuple[torch.Tensor | None, SharedPrefixCache]:
    """(hidden states of `prefix_ids` (1, P, H), a cache holding its keys and values broadcast to `rows`); with
    no prefix (P = 0), (None, an empty cache)."""
    cache = SharedPrefixCache(body.config)
    if prefix_ids.shape[-1] == 0:
        return None, cache
    hidden = body(input_ids=prefix_ids, past_key_values=cache, use_cache=True).last_hidden_state
    cache.broadcast(rows)
    return hidden, cache


def stack_rows(shared: DynamicCache, new: DynamicCache, shared_pad: int, new_pad: int) -> DynamicCache:
    """A cache holding `shared`'s rows, then `new`'s, each left-padded with `*_pad` zero columns (which the
    attention mask hides)."""
    return DynamicCache(ddp_cache_data=[
        (torch.cat([_pad_left(a.keys, shared_pad), _pad_left(b.keys, new_pad)]),
         torch.cat([_pad_left(a.values, shared_pad), _pad_left(b.values, new_pad)]))
        for a, b in zip(shared.layers, new.layers)])


def keep_rows(cache: DynamicCache, rows: torch.Tensor, trim: int) -> DynamicCache:
    """A cache of `cache`'s `rows` only, without its first `trim` columns (padding no kept row needs)."""
    return DynamicCache(ddp_cache_data=[(layer.keys[rows, :, trim:], layer.values[rows, :, trim:])
                                        for layer in cache.layers])


def padding_first(cache: DynamicCache, prefix: int, pads: torch.Tensor) -> DynamicCache:
    """Rows laid out [prefix][pads][own tokens] (`pad_rows` with a prefix) rearranged as [pads][prefix][own
    tokens], the server's left padding. Each key already carries its position (rotary embeddings are applied
    before caching) and the mask hides padding wherever it sits, so only the columns move."""
    width = cache.layers[0].keys.shape[2]
    column, pad = torch.arange(width)[None, :], pads[:, None]
    source = torch.where(column < pad, prefix + column, torch.where(column < pad + prefix, column - pad, column))
    index = source[:, None, :, None]
    return DynamicCache(ddp_cache_data=[(layer.keys.gather(2, index.expand_as(layer.keys)),
                                         layer.values.gather(2, index.expand_as(layer.values)))
                                        for layer in cache.layers])


def _pad_left(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    if columns == 0:
        return tensor
    shape = list(tensor.shape)
    shape[2] = columns
    return torch.cat([tensor.new_zeros(shape), tensor], dim=2)
