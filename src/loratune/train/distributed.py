"""Training on several processes and machines under torchrun: `Torchrun`, the recipe's `Processes` for them.

torchrun (PyTorch's own launcher) starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous; `join_processes` joins them (`gloo` on CPU, `nccl` on CUDA) and returns a `Torchrun`, which
answers the recipe's few questions (see `processes.py`) for many processes: which micro-batches and which
share of the evaluation are mine, sum these numbers over all ranks, am I the one who writes. A run outside
torchrun gets the one-process `Processes` and no communication at all.

Only the adapter is communicated. DistributedDataParallel is told to ignore every frozen parameter and
every buffer, so the base model (quantized or not) is loaded by each rank and never broadcast or reduced;
the trainable parameters are broadcast once from rank 0 and their gradients all-reduced each step.
With `train.distributed: fsdp` the transformer blocks are sharded with FSDP2 (`fully_shard`) instead,
for bases too big for one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import operator
import os
import re
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from loratune.core.errors import ConfigError, LoratuneError
from loratune.errors import ReportedByAnotherRank
from loratune.train.processes import LossFunction, Processes

DEFAULT_TIMEOUT_S = 300
T = TypeVar("T")


class ProcessFailure(LoratuneError):
    """Another rank died or stopped answering; this one gives up instead of waiting forever."""


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


@dataclasses.dataclass
class Torchrun(Processes):
    """torchrun's processes as the recipe sees them (`processes.Processes` is the one-process answer)."""

    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S
    owns_group: bool = False  # this object initialised the process group, so it destroys it
    shard_model: bool = False  # train.distributed: fsdp; every rank then runs the same forwards

    @property
    def joined(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    @property
    def sharded(self) -> bool:
        return self.shard_model and self.joined

    def close(self) -> None:
        if self.owns_group and self.joined:
            dist.destroy_process_group()
        self.owns_group = False

    # --- set-up ----------------------------------------------------------------------------------------------
    def agree(self, step: Callable[[], T]) -> T:
        """Run `step` on every rank; if it raised a user error anywhere, rank 0 reports the first one
        (naming the rank when it is not rank 0's own) and every rank stops, so it is said once."""
        try:
            result, error = step(), None
        except LoratuneError as exc:
            result, error = None, exc
        if not self.joined:
            if error:
                raise error
            return result
        failed = [(rank, message) for rank, message in enumerate(self.gather(str(error) if error else None))
                  if message]
        if not failed:
            return result
        rank, message = failed[0]
        if self.is_main:
            if error is not None and rank == 0:
                raise error
            raise LoratuneError(f"rank {rank}: {message}")
        raise ReportedByAnotherRank(message)

    def on_main(self, step: Callable[[], T]) -> T:
        return self.from_main(self.agree(lambda: step() if self.is_main else None))

    def any(self, flag: bool) -> bool:
        return self.sum([float(flag)])[0] > 0  # one all-reduce of a number, not a pickled gather

    # --- the training step ---------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, loss: LossFunction) -> nn.Module:
        """DDP over the adapter alone, or FSDP2 over the transformer blocks: gradients come out of backward
        already averaged over the ranks. Rank 0's adapter (fresh or resumed) is sent to every rank first."""
        if not self.joined:
            return super().wrap(model, loss)
        forward = LossForward(model, loss)
        self.broadcast_trainable(model)
        if self.shard_model:
            shard_blocks(model, self.device)
            return forward
        frozen = [name for name, p in forward.named_parameters() if not p.requires_grad]
        buffers = [name for name, _ in forward.named_buffers()]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(forward, frozen + buffers)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        with self.reporting():
            return nn.parallel.DistributedDataParallel(forward, device_ids=device_ids, init_sync=False)

    def micro_batches(self, per_rank: int) -> range:
        """Dealt out by rank: this rank's are every `world`-th from its rank (with length grouping the pieces
        run from long to short, so each rank gets a like share)."""
        return range(self.rank, per_rank * self.world, self.world)

    @contextlib.contextmanager
    def accumulating(self, trainer: Callable[..., tuple], sync: bool) -> Iterator[None]:
        """Skip the gradient reduction on all but the last micro-batch of a step; a peer that died during the
        forward or backward becomes a one-line error."""
        with self.reporting(), self._gradient_sync(trainer, sync):
            yield

    @contextlib.contextmanager
    def _gradient_sync(self, module: Callable[..., tuple], sync: bool) -> Iterator[None]:
        if sync or not self.joined:
            yield
        elif isinstance(module, nn.parallel.DistributedDataParallel):
            with module.no_sync():
                yield
        else:  # FSDP2: the sharded blocks accumulate unreduced gradients until the last micro-batch
            blocks = fsdp_blocks(module)
            for block in blocks:
                block.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                for block in blocks:
                    block.set_requires_gradient_sync(True)

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over the ranks, in float64."""
        if not self.joined:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64, device=self._collective_device)
        with self.reporting():
            dist.all_reduce(total)
        return total.tolist()

    @contextlib.contextmanager
    def full_parameters(self, model: nn.Module) -> Iterator[None]:
        """The sharded blocks' parameters whole on every rank (for saving the adapter); a no-op unsharded."""
        blocks = fsdp_blocks(model)
        with self.reporting():
            for block in blocks:
                block.unshard()
        try:
            yield
        finally:
            for block in blocks:
                block.reshard()

    # --- evaluation ----------------------------------------------------------------------------------------
    def shard(self, items: Sequence[T]) -> Sequence[T]:
        """This rank's contiguous block of `items` (all of them when the model is sharded: FSDP needs every
        rank to run the same forwards)."""
        if self.world == 1 or self.shard_model:
            return items
        n = len(items)
        return items[self.rank * n // self.world:(self.rank + 1) * n // self.world]

    def unshard(self, part: list[T]) -> list[T]:
        if self.world == 1 or self.shard_model:
            return part
        return [item for block in self.gather(part) for item in block]

    def total(self, part: T) -> T:
        if self.world == 1 or self.shard_model:
            return part
        return functools.reduce(operator.add, self.gather(part))

    # --- communication -------------------------------------------------------------------------------------
    def gather(self, value: T) -> list[T]:
        """`value` from every rank, in rank order (any picklable object)."""
        if not self.joined:
            return [value]
        values: list[Any] = [None] * self.world
        with self.reporting():
            dist.all_gather_object(values, value)
        return values

    def from_main(self, value: T) -> T:
        """Rank 0's `value` on every rank."""
        if not self.joined:
            return value
        box = [value if self.is_main else None]
        with self.reporting():
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.joined:
            with self.reporting():
                dist.barrier()

    @contextlib.contextmanager
    def reporting(self) -> Iterator[None]:
        """Turn a collective that failed (a peer died, or the timeout passed) into a one-line error."""
        try:
            yield
        except (dist.DistError, RuntimeError) as exc:
            if isinstance(exc, LoratuneError) or not self.joined:
                raise
            text = str(exc).strip()
            first = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0]) if text else type(exc).__name__
            raise ProcessFailure(f"rank {self.rank}: another process died or did not answer within "
                                 f"{self.timeout_s:g} s ({first[:200]})") from exc

    @property
    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def broadcast_trainable(self, model: nn.Module) -> None:
        """Rank 0's adapter (fresh or resumed) on every rank; the frozen base is not sent."""
        with self.reporting(), torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    dist.broadcast(param.data, src=0)


class LossForward(nn.Module):
    """The training forward as a module, so DistributedDataParallel sees it: the loss function may call the
    model's parts separately (body, then a chunked head), which DDP would not notice from the model alone."""

    def __init__(self, model: nn.Module, loss: Callable[..., tuple]) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch: dict[str, torch.Tensor], prefix: int = 0) -> tuple:
        return self.loss(self.model, batch, prefix=prefix)


def join_processes(timeout_s: float = DEFAULT_TIMEOUT_S, distributed: str = "ddp") -> Processes:
    """Join torchrun's process group (reusing one already joined) to train as `distributed` (the config's
    `train.distributed`) says; one plain process when not launched by torchrun."""
    if not under_torchrun():
        return Processes()
    owns = not dist.is_initialized()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if owns:
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return Torchrun(dist.get_rank(), dist.get_world_size(), local_rank, timeout_s, owns, distributed == "fsdp")


def join_checked(load_config: Callable[[], Any], check_data: Callable[[Any], None]) -> tuple[Any, Processes]:
    """Load the config on every rank, join the group, and agree that config and data are sound before any
    rank loads a model: an error is then reported once, by rank 0."""
    try:
        config, error = load_config(), None
    except LoratuneError as exc:
        config, error = None, exc
    train = config.train if config else None
    processes = join_processes(train.distributed_timeout if train else DEFAULT_TIMEOUT_S,
                               train.distributed if train else "ddp")

    def check() -> None:
        if error is not None:
            raise error
        if processes.world > 1:  # one process reads its data in `prepare` anyway
            check_data(config)

    try:
        processes.agree(check)
    except LoratuneError:
        processes.close()
        raise
    return config, processes


def global_batch(train: Any, processes: int) -> int:
    """Examples per optimizer step over all processes (`train` is the run's `TrainSpec`)."""
    return train.batch_size * train.grad_accum * processes


def check_global_batch(saved: dict[str, Any], train: Any, processes: int, where: Any) -> None:
    """A checkpoint resumes on another process count only with the global batch it was written with."""
    written, written_processes = saved.get("config", {}).get("train", {}), saved.get("processes", 1)
    before = written.get("batch_size", 0) * written.get("grad_accum", 0) * written_processes
    now = global_batch(train, processes)
    if before != now:
        raise LoratuneError(
            f"{where}: checkpoint was written with a global batch of {before} (batch_size {written.get('batch_size')}"
            f" x grad_accum {written.get('grad_accum')} x {written_processes} processes), now it is {now}; set "
            f"train.grad_accum so that batch_size x grad_accum x processes = {before}")


# --- FSDP2 ----------------------------------------------------------------------------------------------------
def shard_blocks(model: nn.Module, device: torch.device) -> None:
    """Shard each transformer block with FSDP2; everything outside the blocks (embeddings, head) stays whole
    on every rank, so it must not train: its gradients would not be reduced. Quantized layers the loader
    kept as this rank's rows only (`QuantLinear.keep_shard`) become their sharded parameters as they are."""
    from torch.distributed.fsdp import fully_shard

    from loratune.quant.convert import transformer_blocks

    blocks = list(transformer_blocks(model).values())
    if not blocks:
        raise ConfigError(f"train.distributed: fsdp: {type(model).__name__} names no transformer blocks "
                          "(_no_split_modules); use ddp")
    inside = {id(p) for block in blocks for p in block.parameters()}
    outside = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in inside]
    if outside:
        raise ConfigError(f"train.distributed: fsdp trains only adapters inside the transformer blocks; "
                          f"{outside[0]} is outside them (lora.target_modules / modules_to_save); use ddp")
    model.to(device)
    for block in blocks:
        held = quantized_as_parameters(block)
        fully_shard(block, reshard_after_forward=True)  # each block is its own root, which FSDP2 would otherwise
        adopt_shards(held)                              # keep whole from forward to backward: all at once


def quantized_as_parameters(block: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """FSDP2 shards parameters, not buffers: a quantized layer's codes and scales become frozen parameters of
    their block, so each rank holds its shard of the quantized base (the scalar `scale_mean` stays a buffer).

    A tensor the loader kept as this rank's rows only is replaced by a stand-in of its full shape on the meta
    device, which FSDP2 shards without storage; returned as (layer, name, rows) for `adopt_shards`."""
    from loratune.quant.linear import QuantLinear

    held = []
    for layer in block.modules():
        if isinstance(layer, QuantLinear):
            for key in layer.shardable():
                tensor = layer._buffers.pop(key)
                if key in layer.full_shapes:
                    held.append((layer, key, tensor))
                    tensor = torch.empty(layer.full_shapes[key], dtype=tensor.dtype, device="meta")
                layer.register_parameter(key, nn.Parameter(tensor, requires_grad=False))
    return held


def adopt_shards(held: list[tuple[nn.Module, str, torch.Tensor]]) -> None:
    """Make each rank's loaded rows the local shard of the parameter FSDP2 made from its stand-in (through
    `load_state_dict(assign=True)`, whose hook lets FSDP2 pad the last rank's shorter shard)."""
    from torch.distributed.tensor import DTensor

    for layer, key, rows in held:
        stand_in = getattr(layer, key)
        if stand_in.to_local().shape != rows.shape:
            raise LoratuneError(f"FSDP2 cut a {tuple(stand_in.shape)} tensor into {tuple(stand_in.to_local().shape)} "
                                f"on this rank, the loader kept {tuple(rows.shape)}")
        shard = DTensor.from_local(rows, stand_in.device_mesh, stand_in.placements, run_check=False,
                                   shape=stand_in.shape, stride=stand_in.stride())
        layer.load_state_dict({key: shard}, strict=False, assign=True)
        del layer.full_shapes[key]


def fsdp_blocks(module: nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]
