"""From examples to the batch the model reads, as `train.batching` says: padded, packed or shared-prefix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loratune.core.errors import LoratuneError
from loratune.data.collate import collate
from loratune.data.packing import grouped_order, pack_batch
from loratune.train.shared_prefix import batch_prefix_length
from loratune.train.step import to_device


@dataclass(frozen=True)
class BatchMaker:
    """Builds batches for one run; `make` returns (batch on `device`, shared-prefix length or 0)."""

    batching: str
    task: str
    pad_id: int
    checkpointing: bool = False  # a checkpointed layer drops the cache a shared prefix runs against

    def make(self, examples: Sequence[dict[str, Any]], device: torch.device,
             training: bool = True) -> tuple[dict[str, torch.Tensor], int]:
        causal = self.task == "causal-lm"
        if self.batching == "packed" and causal:
            return to_device(pack_batch(examples, self.pad_id), device), 0
        batch = to_device(collate(examples, self.pad_id, self.task), device)
        share = self.batching == "shared_prefix" and causal and not (training and self.checkpointing)
        return batch, batch_prefix_length(batch) if share else 0


def order_keys(examples: Sequence[dict[str, Any]], length_grouped: bool, prefix_grouped: bool) -> list | None:
    """What `BatchOrder` groups batches by: longest first, or the token lists themselves (examples that
    start alike end up together), or nothing."""
    if length_grouped:
        return [-len(e["input_ids"]) for e in examples]
    if prefix_grouped:
        return [list(e["input_ids"]) for e in examples]
    return None


class BatchOrder:
    """Which examples form micro-batch k: a fresh seeded shuffle each epoch, so resuming needs only k."""

    def __init__(self, size: int, batch_size: int, seed: int, keys: Sequence[Any] | None = None) -> None:
        """`keys` (one per example), when given, group each window of shuffled batches by key."""
        if size == 0:
            raise LoratuneError("no training examples after loading the data")
        self.size, self.batch_size, self.seed, self.keys = size, min(batch_size, size), seed, keys
        self.per_epoch = self.size // self.batch_size
        self._epoch, self._perm = -1, None

    def batch(self, k: int) -> list[int]:
        epoch, index = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=generator).tolist()
            if self.keys is not None:
                self._perm = grouped_order(self._perm, self.keys, self.batch_size)
        return self._perm[index * self.batch_size:(index + 1) * self.batch_size]
