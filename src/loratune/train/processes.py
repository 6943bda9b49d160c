"""The seam between the training recipe and the processes it runs in.

`loop.py` is one recipe for one process and for many; where they differ it asks a `Processes` at a few named
points: agree on a set-up step, let rank 0 alone do one, wrap the model for training, deal out the step's
micro-batches, sum the step's numbers, merge the evaluation's shares, and keep each rank's random stream.
This class answers for one process: every point is a pass-through, with no communication.
`distributed.Torchrun` answers for torchrun's processes (DDP or FSDP2), fixed when it joins the group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")

#: The training forward: (model, batch, prefix=...) -> (mean loss, logits or None, weight).
LossFunction = Callable[..., tuple]


@dataclasses.dataclass
class Processes:
    """One process: rank 0 of 1. The base of `distributed.Torchrun`, which overrides what communicates."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")

    @property
    def sharded(self) -> bool:
        """Whether the ranks each hold a shard of the adapter and its optimizer state (FSDP2): a checkpoint then
        has every rank write its shard of the optimizer state."""
        return False

    def close(self) -> None:
        """Leave the process group, if this object joined one."""

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- set-up: steps every rank takes, or rank 0 alone ------------------------------------------------------
    def agree(self, step: Callable[[], T]) -> T:
        """Run `step` on every rank; a user error on any rank stops all of them and is said once."""
        return step()

    def on_main(self, step: Callable[[], T]) -> T:
        """Run `step` on rank 0 alone (it owns the output folder); every rank gets its result, or stops with
        its error."""
        return step()

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set on any rank (a stop signal), so every rank acts on it after the same step."""
        return flag

    # --- the training step ----------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, loss: LossFunction) -> Callable[..., tuple]:
        """The callable a training step runs: `trainer(batch, prefix=...)` -> (loss, logits, weight). Build the
        optimizer after this: sharding may replace the parameters."""
        return functools.partial(loss, model)

    def micro_batches(self, per_rank: int) -> range:
        """Which of the step's `per_rank x world` micro-batches (the pieces of its global batch, in order) this
        rank runs."""
        return range(per_rank)

    def accumulating(self, trainer: Callable[..., tuple], sync: bool) -> contextlib.AbstractContextManager:
        """Around one micro-batch's forward and backward: `sync` is False on all but the step's last, whose
        backward reduces the gradients over the ranks."""
        return contextlib.nullcontext()

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over the ranks (loss sums and token counts)."""
        return list(values)

    @contextlib.contextmanager
    def full_parameters(self, model: nn.Module) -> Iterator[None]:
        """The model's parameters whole on this rank while the block runs (for saving the adapter)."""
        yield

    # --- evaluation ------------------------------------------------------------------------------------------
    def shard(self, items: Sequence[T]) -> Sequence[T]:
        """This rank's share of the evaluation data."""
        return items

    def unshard(self, part: list[T]) -> list[T]:
        """Every rank's `shard` results joined in the data's order, on every rank."""
        return part

    def total(self, part: T) -> T:
        """The sum (`+`) of every rank's result over its `shard`."""
        return part

    def gather(self, value: T) -> list[T]:
        """`value` from every rank, in rank order."""
        return [value]

    def barrier(self) -> None:
        """Wait for every rank."""

    # --- randomness ------------------------------------------------------------------------------------------
    def seed_rank(self, seed: int) -> None:
        """Give every rank but 0 its own random stream (dropout masks), after the shared-seed model set-up.

        Rank 0 keeps the stream a single process would have.
        """
        if self.rank:
            torch.manual_seed(seed * 1_000_003 + self.rank)

    def rank_rng(self, saved: dict[str, Any], seed: int) -> dict[str, Any] | None:
        """The RNG state this rank resumes with: its own when the process count is unchanged, rank 0's on rank
        0, else None (a fresh per-rank stream: exact equality with dropout then cannot hold)."""
        streams = saved.get("rank_rng") or [saved["rng"]]
        if len(streams) == self.world or self.rank == 0:
            return streams[self.rank]
        self.seed_rank(seed + saved["state"]["step"])
        return None
