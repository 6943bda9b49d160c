"""From examples to the batch the model reads, as `train.batching` says: padded, packed or shared-prefix.

A padded batch is right-padded rows. A packed batch lays its sequences one after another in rows as wide as
its longest sequence (first fit, longest first), with position ids restarting at 0 for each sequence and no
attention mask: transformers reads the restarting positions as packed sequences and keeps attention within
each (a block-diagonal causal mask). The first token of each sequence gets no label, since in a padded batch
nothing predicts it either; the loss and the adapter gradients then equal the padded batch's. A row's
unused tail is padding laid out as one more short sequence without labels, so it never attends to real
tokens. A shared-prefix batch is the padded batch plus the length of its rows' common first tokens, which
the body then computes once (`shared_prefix.shared_prefix_hidden`).

`BatchOrder` says which examples form micro-batch k; prefix-grouped order (the token lists sorted within
windows of batches) puts examples that start alike, such as those of one prompt template among several, in
the same batches, so a shared-prefix batch has a long common prefix to compute once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loratune.core.errors import ConfigError, LoratuneError
from loratune.tasks import IGNORE_INDEX

MIN_PREFIX = 8  # below this, the second forward call costs more than the prefix saves


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, prefix: int = 0,
             left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token rows at one width: padded on the right, or with `left` laid out as
    [the first `prefix` tokens][pads][the rest], so every row's last token is the batch's last."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        start = width - len(row) + prefix if left else prefix
        for begin, part in ((0, row[:prefix]), (start, row[prefix:])):
            if not part:
                continue
            ids[r, begin:begin + len(part)] = torch.tensor(part, dtype=torch.long)
            mask[r, begin:begin + len(part)] = 1
    return ids, mask


def collate(examples: Sequence[dict[str, Any]], pad_token_id: int, task: str) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask` and `labels` for a batch, padded on the right.

    Labels are padded with -100 so padding never counts in the loss; classification labels are
    one class id per example.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    if pad_token_id is None:
        raise ConfigError("tokenizer has no pad token id; set one before batching")
    ids, mask = pad_rows([list(e["input_ids"]) for e in examples], pad_token_id)
    if task == "classification":
        labels = torch.tensor([int(e["label"]) for e in examples], dtype=torch.long)
    else:
        labels = pad_rows([list(e["labels"]) for e in examples], IGNORE_INDEX)[0]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


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
    little left over. Every length must be at most `width`. Packed batches and shared-prefix remainders both
    use it."""
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


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of `rows`, leaving every row at least one token of its own (so
    each row has a remainder that carries its last hidden state); 0 below `MIN_PREFIX`, where computing it
    once costs more than it saves. The one place that decides a shared prefix."""
    limit = min((len(row) for row in rows), default=0) - 1
    if len(rows) < 2 or limit < MIN_PREFIX:
        return 0
    first = rows[0]
    length = next((i for i in range(limit) if any(row[i] != first[i] for row in rows[1:])), limit)
    return length if length >= MIN_PREFIX else 0


@dataclass(frozen=True)
class BatchMaker:
    """Builds batches for one run; `make` returns (batch on `device`, shared-prefix length or 0)."""

    batching: str
    task: str
    pad_id: int
    checkpointing: bool = False  # a checkpointed layer keeps no cache: only batches that fit one row share
    sharded: bool = False  # FSDP: ranks on their own batches would make one or two body forwards each, by its
    # prefix and length, and so pair the wrong shard gathers: training batches then run padded

    def strategy(self, training: bool = True) -> str:
        """The strategy a batch gets: `batching` where it applies (causal LMs; shared prefixes not in training
        under FSDP), else padded."""
        if self.task != "causal-lm" or (self.batching == "shared_prefix" and training and self.sharded):
            return "padded"
        return self.batching

    def make(self, examples: Sequence[dict[str, Any]], device: torch.device,
             training: bool = True) -> tuple[dict[str, torch.Tensor], int]:
        strategy = self.strategy(training)
        if strategy == "packed":
            return to_device(pack_batch(examples, self.pad_id), device), 0
        batch = to_device(collate(examples, self.pad_id, self.task), device)
        if strategy == "shared_prefix":
            return batch, common_prefix_length([e["input_ids"] for e in examples])
        return batch, 0


def order_keys(examples: Sequence[dict[str, Any]], prefix_grouped: bool) -> list | None:
    """What `BatchOrder` groups batches by: the token lists themselves (examples that start alike end up
    together), or nothing."""
    return [list(e["input_ids"]) for e in examples] if prefix_grouped else None


def grouped_order(order: Sequence[int], keys: Sequence[Any], batch_size: int, group: int = 50) -> list[int]:
    """`order` rearranged so each batch holds examples with neighbouring `keys` (indexed by example): windows
    of `group` batches are sorted by key; which examples fall in which window stays random."""
    window = batch_size * group
    out: list[int] = []
    for start in range(0, len(order), window):
        out += sorted(order[start:start + window], key=lambda i: keys[i])
    return out


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
