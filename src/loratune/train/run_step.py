"""A run in progress and its optimizer step: the order of global batches, the step's micro-batches and their
gradients, clipping and the update. The recipe (`loop.py`) and the rate search (`auto_lr.py`, and so
`loratune sweep`) both train through `optimizer_step`, so a candidate rate is tried on the steps the run
will take.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import torch

from loratune.batching import BatchOrder, order_keys
from loratune.core.errors import ConfigError, LoratuneError
from loratune.core.layers import LINEAR_TYPES, LoraLinear
from loratune.core.shared_input import learning_shared_inputs
from loratune.train.checkpoint import latest_checkpoint
from loratune.train.distributed import global_batch
from loratune.train.session import Session
from loratune.train.step import batch_loss


class TrainingDiverged(LoratuneError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass
class RunState:
    """Where a run stands: what a checkpoint saves and resuming restores (with the optimizer and RNG)."""

    step: int = 0  # also the position in the data: step k trains global batch k of `batch_order`
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    best: float | None = None  # lowest evaluation loss so far, for early stopping
    bad_evals: int = 0
    tokens: int = 0
    seconds: float = 0.0
    stopped_early: bool = False


@dataclasses.dataclass
class Run:
    """A run in progress: the session, the optimizer, the state, and where the run writes."""

    session: Session
    out: Path
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: RunState
    before: dict[str, Any]
    samples_before: list[dict[str, str]]
    board: Any = None
    trainer: Any = None  # what a training step calls: (loss, logits, weight) of a batch (`Processes.wrap`)

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    def record(self, entry: dict[str, Any]) -> None:
        """Add an entry to the history, `metrics.jsonl` and TensorBoard (when installed)."""
        self.state.history.append(entry)
        if not self.session.processes.is_main:
            return
        with (self.out / "metrics.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
        if self.board:
            for key, value in entry.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.board.add_scalar(f"{entry['kind']}/{key}", value, entry["step"])


def trainer_for(session: Session) -> Any:
    """What a training step calls: the batch loss, through DDP or FSDP under torchrun. The LoRA layers that
    read one input are learned first (`learn_shared_inputs`), so that a fresh run and a resumed one compute
    alike from their first step."""
    loss = functools.partial(batch_loss, task=session.config.model.task, loss_chunk=session.loss_chunk)
    trainer = session.processes.wrap(session.model, loss)
    learn_shared_inputs(session, trainer)
    return trainer


def learn_shared_inputs(session: Session, trainer: Any) -> None:
    """One forward of the first two training examples, as a step runs them but without gradients and in eval
    mode (no dropout mask drawn: the run's random stream is untouched), in which `core.shared_input` learns
    which LoRA layers read one input."""
    examples, model = session.data.train_examples, session.model
    if not examples or not any(isinstance(m, LoraLinear) and type(m.base_layer) in LINEAR_TYPES
                               for m in model.modules()):
        return  # no layer could run as one node (a quantized base): no forward spent on it
    first = [examples[i] for i in range(min(len(examples), session.config.train.batch_size, 2))]
    batch, prefix = session.batches.make(first, session.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), session.autocast(), learning_shared_inputs(model):
            trainer(batch, prefix=prefix)
    finally:
        model.train(was_training)


def batch_order(session: Session) -> BatchOrder:
    """The run's order of global batches (batch k for step k), grouped as `train.prefix_grouped`
    says. It depends on the seed and the global batch alone, not on how a step is split
    into micro-batches, accumulation and processes, so every such split trains on the same examples."""
    tc, examples = session.config.train, session.data.train_examples
    size = global_batch(tc, session.processes.world)
    pieces = tc.grad_accum * session.processes.world
    if min(size, len(examples)) < pieces:
        raise ConfigError(f"train: {len(examples)} training examples cannot fill {pieces} micro-batches "
                          f"(train.grad_accum x processes); lower train.grad_accum or the process count")
    return BatchOrder(len(examples), size, tc.seed, order_keys(examples, tc.prefix_grouped))


def micro_batch(step_examples: list[int], index: int, pieces: int) -> list[int]:
    """Piece `index` of a global batch cut into `pieces` micro-batches of (nearly) equal size, in order."""
    size = len(step_examples)
    return step_examples[index * size // pieces:(index + 1) * size // pieces]


def optimizer_step(run: Run, order: BatchOrder) -> tuple[float, int, float]:
    """Step `run.state.step` of the run: gradients of its global batch, clipped as `train.max_grad_norm`
    says, then the update and the schedule's next rate; returns (loss, tokens, the rate it stepped with)."""
    max_norm = run.session.config.train.max_grad_norm
    loss, tokens = accumulate_gradients(run, order)
    if max_norm:
        torch.nn.utils.clip_grad_norm_(_trained(run), max_norm)
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.state.step += 1
    return loss, tokens, lr


def accumulate_gradients(run: Run, order: BatchOrder) -> tuple[float, int]:
    """Forward and backward over this rank's micro-batches of the step; returns the step's (loss, tokens)
    over all ranks.

    The step's global batch (the seeded order's batch number `step`) is cut into `grad_accum x processes`
    micro-batches, dealt out by rank, and the loss is the mean over every predicted token of all of them:
    each micro-batch's summed loss is back-propagated and the gradients are divided by the global token
    count afterwards. So every split of the same global batch (1 x 4, 1 x 2 x accumulation 2, 2 x 2, ...)
    takes the same step.
    """
    session, state, processes = run.session, run.state, run.session.processes
    loss_sum, weight_sum, tokens = 0.0, 0, 0
    step_examples, mine = order.batch(state.step), processes.micro_batches(session.config.train.grad_accum)
    for index in mine:
        piece = micro_batch(step_examples, index, session.config.train.grad_accum * processes.world)
        examples = [session.data.train_examples[i] for i in piece]
        batch, prefix = session.batches.make(examples, session.device)
        with processes.accumulating(run.trainer, sync=index == mine[-1]):
            with session.autocast():
                loss, _, weight = run.trainer(batch, prefix=prefix)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"loss became {loss.item()} at step {state.step + 1}; "
                                       f"{last_good(run.checkpoints)} (try a lower learning rate)")
            (loss * weight).backward()
        loss_sum += loss.item() * weight
        weight_sum += weight
        tokens += int(batch["attention_mask"].sum())
    loss_sum, weight_sum, tokens = processes.sum([loss_sum, weight_sum, tokens])
    # DDP and FSDP average gradients over the ranks; the step's loss is a mean over all its tokens.
    grads = [p.grad for p in _trained(run) if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, processes.world / max(weight_sum, 1))
    return loss_sum / max(weight_sum, 1), int(tokens)


def last_good(checkpoints: Path) -> str:
    """Where a run that cannot go on left its progress (for its error message)."""
    found = latest_checkpoint(checkpoints)
    return f"last good checkpoint: {found}" if found else "no checkpoint was written yet"


def _trained(run: Run) -> list[torch.Tensor]:
    """The parameters the optimizer steps (the adapter's), without a walk over every frozen one each step."""
    return [p for group in run.optimizer.param_groups for p in group["params"]]
