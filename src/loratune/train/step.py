"""The training step as plain functions over a batch: loss, then one optimizer update."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import collate

IGNORE = -100


def collate_examples(examples: Sequence[dict], pad_id: int, task: str) -> dict[str, torch.Tensor]:
    return collate(list(examples), pad_id, task)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean loss, logits, weight): weight is the number of predicted tokens (or rows) the mean is over."""
    if task == "classification":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"]), logits, batch["labels"].numel()
    if task == "seq2seq":
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss, out.logits, int((batch["labels"] != IGNORE).sum())
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    weight = int((targets != IGNORE).sum())
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                           reduction="sum") / max(weight, 1)
    return loss, logits, weight
