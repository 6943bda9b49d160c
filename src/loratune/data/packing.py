"""Padding-free batches and length-grouped order, for causal language models of any data format.

A packed batch lays its sequences one after another in rows as wide as its longest sequence (first fit,
longest first), with position ids restarting at 0 for each sequence and no attention mask: transformers
reads the restarting positions as packed sequences and keeps attention within each (a block-diagonal
causal mask). The first token of each sequence gets no label, since in a padded batch nothing predicts
it either; the loss and the adapter gradients then equal the padded batch's. A row's unused tail is
padding laid out as one more short sequence without labels, so it never attends to real tokens.

Length-grouped order is the cheaper alternative: batches drawn from runs of similar lengths, so the
right-padded batch wastes little. Prefix-grouped order (the token lists sorted within the same windows)
puts examples that start alike, such as those of one prompt template among several, in the same batches,
so a shared-prefix batch has a long common prefix to compute once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from loratune.tasks import IGNORE_INDEX


def pack_batch(examples: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """`input_ids`, `position_ids`, `labels` and `attention_mask` (1 on real tokens; for counting only, the
    model does not read it) of examples packed into as few rows as the longest example allows."""
    if not examples:
        raise ValueError("pack_batch needs at least one example")
    lengths = [len(e["input_ids"]) for e in examples]
    width = max(lengths)
    rows = first_fit_rows(lengths, width)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_token_id, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    real = torch.zeros(shape, dtype=torch.long)
    for r, members in enumerate(rows):
        start = 0
        for index in members:
            n = lengths[index]
            ids[r, start:start + n] = torch.tensor(examples[index]["input_ids"], dtype=torch.long)
            labels[r, start + 1:start + n] = torch.tensor(examples[index]["labels"][1:], dtype=torch.long)
            positions[r, start:start + n] = torch.arange(n)
            real[r, start:start + n] = 1
            start += n
        positions[r, start:] = torch.arange(width - start)
    return {"input_ids": ids, "position_ids": positions, "labels": labels, "attention_mask": real}


def first_fit_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Indices of sequences of `lengths` laid into rows of `width` (first fit, longest first): few rows and
    little left over. Every length must be at most `width`."""
    if lengths and max(lengths) > width:
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit rows of {width}")
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(width)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


def grouped_order(order: Sequence[int], keys: Sequence[Any], batch_size: int, group: int = 50) -> list[int]:
    """`order` rearranged so each batch holds examples with neighbouring `keys` (indexed by example): windows
    of `group` batches are sorted by key; which examples fall in which window stays random."""
    window = batch_size * group
    out: list[int] = []
    for start in range(0, len(order), window):
        out += sorted(order[start:start + window], key=lambda i: keys[i])
    return out
