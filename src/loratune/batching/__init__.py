"""Batching: from examples to the batch the model reads, and the key/value caches a shared prefix runs on.

`batches` builds padded, packed and shared-prefix batches (`BatchMaker`, one strategy per run) and orders
them (`BatchOrder`); it holds the one first-fit packer and the one common-prefix function. `shared_prefix`
runs a shared-prefix batch's body (its prefix once, the remainders packed). `kv_cache` is the one module that
builds and edits transformers' caches: the prefix cache of training, evaluation, label scoring and
generation, and the server's shared cache. Nothing here imports the trainer, so the server uses it too.
"""

from loratune.batching.batches import (
    MIN_PREFIX,
    BatchMaker,
    BatchOrder,
    collate,
    common_prefix_length,
    first_fit_rows,
    grouped_order,
    order_keys,
    pack_batch,
    pad_rows,
    to_device,
)
from loratune.batching.kv_cache import SharedPrefixCache, keep_rows, padding_first, prefix_cache, stack_rows
from loratune.batching.shared_prefix import (
    checkpointed,
    decoder_body,
    fallback_warning,
    max_positions,
    packed_mask_obstacle,
    shared_prefix_hidden,
)

__all__ = [
    "MIN_PREFIX", "BatchMaker", "BatchOrder", "SharedPrefixCache", "checkpointed", "collate", "common_prefix_length",
    "decoder_body", "fallback_warning", "first_fit_rows", "grouped_order", "keep_rows", "max_positions", "order_keys",
    "pack_batch", "packed_mask_obstacle", "pad_rows", "padding_first", "prefix_cache", "shared_prefix_hidden",
    "stack_rows", "to_device",
]
