"""Batch examples into right-padded tensors for training and loss evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from loratune.core.errors import ConfigError
from loratune.tasks import IGNORE_INDEX


def collate(examples: Sequence[dict[str, Any]], pad_token_id: int, task: str) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask` and `labels` for a batch, padded on the right.

    Labels are padded with -100 so padding never counts in the loss; classification labels are
    one class id per example.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    if pad_token_id is None:
        raise ConfigError("tokenizer has no pad token id; set one before batching")
    input_ids = [list(e["input_ids"]) for e in examples]
    batch = {
        "input_ids": _pad(input_ids, pad_token_id),
        "attention_mask": _pad([[1] * len(ids) for ids in input_ids], 0),
    }
    if task == "classification":
        batch["labels"] = torch.tensor([int(e["label"]) for e in examples], dtype=torch.long)
    else:
        batch["labels"] = _pad([list(e["labels"]) for e in examples], IGNORE_INDEX)
    return batch


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out
