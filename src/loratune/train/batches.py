"""From examples to the batch the model reads, as `train.batching` says: padded, packed or shared-prefix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loratune.data.collate import collate
from loratune.data.packing import pack_batch
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
