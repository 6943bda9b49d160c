"""One training run as a recipe that reads top to bottom: set up (or resume), then repeat one step with an
evaluation and a checkpoint when due, then evaluate, save the adapter and write the report.

`fit(config)` is what `loratune train` calls; a library user can call it too, or reuse its steps.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from loratune.core.adapters import trainable_parameters
from loratune.core.atomic_write import write_text_atomic
from loratune.core.errors import ConfigError, LoratuneError, WriteError
from loratune.core.peft_format import save_adapter
from loratune.errors import ReportedByAnotherRank
from loratune.train.batches import BatchOrder, order_keys
from loratune.train.checkpoint import (
    latest_checkpoint,
    load_newest_readable,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from loratune.train.distributed import Processes, check_global_batch, global_batch, join_processes
from loratune.train.optim import build_optimizer, build_scheduler
from loratune.train.report import plot_history, write_metrics, write_report
from loratune.train.run_config import RunConfig, config_to_yaml
from loratune.train.run_folder import claim_output_dir
from loratune.train.session import ADAPTER, Session, prepare
from loratune.train.step import batch_loss
from loratune.train.stop_signals import RunStopped, stop_requests

# Keys a resumed run may change: where it writes, and how the same global batch is spread over processes.
RESUMABLE_CHANGES = {"output_dir", "train.grad_accum", "train.distributed", "train.distributed_timeout"}


class TrainingDiverged(LoratuneError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass
class RunState:
    """Where a run stands: what a checkpoint saves and resuming restores (with the optimizer and RNG)."""

    step: int = 0
    micro: int = 0  # micro-batches consumed: the position in the data
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
    trainer: Any = None  # the module a training step calls: (loss, logits, weight) of a batch, DDP-wrapped or not

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


# --- the recipe ----------------------------------------------------------------------------------------------
def fit(config: RunConfig, resume: bool = False, quiet: bool | None = None,
        processes: Processes | None = None) -> dict[str, Any]:
    """Train one LoRA adapter as `config` says and write everything into `config.output_dir`.

    Under torchrun every process calls this; `processes` (default: join torchrun's group, if any) says which
    share of the work is this one's, and only rank 0 writes.
    """
    own_processes = processes is None
    processes = processes or join_processes(config.train.distributed_timeout)
    try:
        return _fit(config, resume, _quiet(quiet) or not processes.is_main, processes)
    finally:
        if own_processes:
            processes.close()


def _fit(config: RunConfig, resume: bool, quiet: bool, processes: Processes) -> dict[str, Any]:
    out, tc = Path(config.output_dir), config.train
    with ExitStack() as folder, stop_requests() as stops:
        # rank 0 owns the folder (lock, emptiness, leftovers); a refusal is said once, by rank 0
        processes.agree(lambda: folder.enter_context(claim_output_dir(out, resume)) if processes.is_main else None)
        resume = resume and _has_checkpoint(out, config, processes)
        session = processes.agree(lambda: prepare(config, quiet, processes=processes))
        if _stop_agreed(processes, stops):
            raise _stopped(processes, RunStopped(stops.signal_name, 0, None))
        run = resume_run(session, out) if resume else start_run(session, out)
        session.model.train()
        order = batch_order(session)
        progress = session.progress(total=tc.max_steps, initial=run.state.step, desc="training")
        try:
            while run.state.step < tc.max_steps and not run.state.stopped_early and not _stop_agreed(processes, stops):
                train_step(run, order, progress)
                if _due(tc.eval_every, run.state.step) and session.data.eval_examples and run.state.step < tc.max_steps:
                    evaluate_during_training(run)
                if _due(tc.checkpoint_every, run.state.step):
                    save_run_checkpoint(run)
        finally:
            progress.close()
        if _stop_agreed(processes, stops):  # between steps: keep the progress, then say how to go on
            raise _stopped(processes, RunStopped(stops.signal_name, run.state.step, checkpoint_now(run)))
        return finish(run)


def _has_checkpoint(out: Path, config: RunConfig, processes: Processes) -> bool:
    """Whether `--resume` has a checkpoint to continue from. A run stopped before its first checkpoint (its
    own config.yaml is there, no checkpoint yet) starts again from step 0 with a warning, which equals an
    uninterrupted run; a folder that holds neither is an error, as is another run's config."""
    def check() -> bool:
        checkpoints, saved = out / "checkpoints", out / "config.yaml"
        if latest_checkpoint(checkpoints) is not None:
            return True
        if not saved.is_file():
            raise LoratuneError(f"{checkpoints}: no complete checkpoint to resume from")
        if saved.read_text(encoding="utf-8") != config_to_yaml(config):
            raise LoratuneError(f"output_dir {out} holds another run's config.yaml and no checkpoint; choose "
                                "another output_dir")
        print(f"loratune: warning: {checkpoints}: no complete checkpoint yet; starting again from step 0",
              file=sys.stderr)
        return False

    return processes.from_main(processes.agree(lambda: check() if processes.is_main else None))


def _stop_agreed(processes: Processes, stops: Any) -> bool:
    """Whether a stop signal reached this process or, under torchrun, any other: every rank stops after the
    same step, so the checkpoint holds all ranks' streams."""
    return processes.sum([float(stops.requested)])[0] > 0  # one all-reduce of a number, not a pickled gather


def _stopped(processes: Processes, stop: RunStopped) -> Exception:
    """The stop as rank 0 says it; the other ranks end without a second message."""
    return stop if processes.is_main else ReportedByAnotherRank(str(stop))


def start_run(session: Session, out: Path) -> Run:
    """A fresh run: new optimizer, and the "before" evaluation as the history's first entry."""
    optimizer, scheduler = _optimizer(session)
    before, samples_before = session.evaluate(full=True)
    session.processes.seed_rank(session.config.train.seed)
    state = RunState(history=[{"kind": "eval", "step": 0, **before}] if before else [])
    return _open_run(Run(session, out, optimizer, scheduler, state, before, samples_before))


def resume_run(session: Session, out: Path) -> Run:
    """Continue from the newest readable checkpoint (newer unreadable ones are passed over with a warning):
    adapter, optimizer, scheduler, state and RNG streams.

    Rank 0 reads it and sends it to the others, so the output folder need not be shared between machines.
    """
    processes = session.processes
    optimizer, scheduler = _optimizer(session)
    saved = processes.agree(lambda: read_latest_checkpoint(session, out) if processes.is_main else None)
    saved = processes.from_main(saved)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rng = processes.rank_rng(saved, session.config.train.seed)
    if rng is not None:
        set_rng_state(rng)
    state = RunState(**saved["state"])
    return _open_run(Run(session, out, optimizer, scheduler, state, saved["before"], saved["samples_before"]))


def batch_order(session: Session) -> BatchOrder:
    """The run's order of micro-batches, grouped as `train.length_grouped` / `train.prefix_grouped` say."""
    tc, examples = session.config.train, session.data.train_examples
    return BatchOrder(len(examples), tc.batch_size, tc.seed, order_keys(examples, tc.length_grouped,
                                                                        tc.prefix_grouped))


def train_step(run: Run, order: BatchOrder, progress: Any) -> None:
    """One optimizer step over `grad_accum` micro-batches; logs loss, learning rate and throughput."""
    tc, state, model = run.session.config.train, run.state, run.session.model
    started = time.perf_counter()
    loss, tokens = accumulate_gradients(run, order)
    if tc.max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], tc.max_grad_norm)
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    elapsed = time.perf_counter() - started
    state.tokens += tokens
    state.seconds += elapsed
    run.record({"kind": "train", "step": state.step, "loss": loss, "lr": lr, "tokens_per_s": tokens / elapsed})
    progress.update(1)
    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / elapsed:.0f}")


def accumulate_gradients(run: Run, order: BatchOrder) -> tuple[float, int]:
    """Forward and backward over this rank's micro-batches of the step; returns the step's (loss, tokens)
    over all ranks.

    The step's micro-batches are the next `grad_accum x processes` of one seeded global order, dealt out by
    rank, and the loss is the mean over every predicted token of all of them: each micro-batch's summed
    loss is back-propagated and the gradients are divided by the global token count afterwards. So one
    process with batch B and accumulation 2 takes the same step as two processes with batch B.
    """
    session, state, processes = run.session, run.state, run.session.processes
    tc = session.config.train
    loss_sum, weight_sum, tokens = 0.0, 0, 0
    with processes.reporting():
        for micro in range(tc.grad_accum):
            index = state.micro + micro * processes.world + processes.rank
            examples = [session.data.train_examples[i] for i in order.batch(index)]
            batch, prefix = session.batches.make(examples, session.device)
            with processes.gradient_sync(run.trainer, micro == tc.grad_accum - 1):
                with session.autocast():
                    loss, _, weight = run.trainer(batch, prefix)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"loss became {loss.item()} at step {state.step + 1}; "
                                           f"{_last_good(run.checkpoints)} (try a lower learning rate)")
                (loss * weight).backward()
            loss_sum += loss.item() * weight
            weight_sum += weight
            tokens += int(batch["attention_mask"].sum())
        loss_sum, weight_sum, tokens = processes.sum([loss_sum, weight_sum, tokens])
    state.micro += tc.grad_accum * processes.world
    # DDP and FSDP average gradients over the ranks; the step's loss is a mean over all its tokens.
    _scale_gradients(session.model, processes.world / max(weight_sum, 1))
    return loss_sum / max(weight_sum, 1), int(tokens)


def evaluate_during_training(run: Run) -> None:
    """Loss on the evaluation split; counts evaluations without improvement, for early stopping."""
    state, patience = run.state, run.session.config.train.early_stopping_patience
    metrics, _ = run.session.evaluate(full=False)
    run.record({"kind": "eval", "step": state.step, **metrics})
    if state.best is None or metrics["loss"] < state.best:
        state.best, state.bad_evals = metrics["loss"], 0
    else:
        state.bad_evals += 1
    if patience and state.bad_evals >= patience:
        state.stopped_early = True


def save_run_checkpoint(run: Run) -> None:
    """Write checkpoint `step-N` (rank 0, with every rank's RNG stream); refuses weights that are no longer
    finite (nothing worth resuming)."""
    model, state, config, processes = run.session.model, run.state, run.session.config, run.session.processes
    streams = processes.gather(rng_state())
    if not processes.is_main:
        return
    if not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
        raise TrainingDiverged(f"adapter weights became non-finite at step {state.step}; "
                               f"{_last_good(run.checkpoints)} (try a lower learning rate)")
    save_checkpoint(run.checkpoints, state.step, model, ADAPTER, {
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "state": dataclasses.asdict(state), "rng": streams[0], "rank_rng": streams, "processes": processes.world,
        "before": run.before,
        "samples_before": run.samples_before, "config": config.model_dump(mode="json")},
        config.train.keep_checkpoints)


def checkpoint_now(run: Run) -> Path:
    """The checkpoint of the run's current step, written now unless it already exists (rank 0 decides: only
    its folder is sure to hold the checkpoints)."""
    processes, path = run.session.processes, run.checkpoints / f"step-{run.state.step}"
    latest = latest_checkpoint(run.checkpoints) if processes.is_main else None
    if processes.from_main(latest is not None and latest.name == path.name):
        return path
    save_run_checkpoint(run)
    return path


def _kept_in_checkpoint(run: Run) -> str:
    """Say where the run's progress is after the final adapter could not be written (rank 0 alone gets here,
    so under torchrun no new checkpoint, which needs every rank, is tried)."""
    if run.session.processes.joined:
        return _last_good(run.checkpoints)
    try:
        path = checkpoint_now(run)
    except WriteError as exc:
        return f"no checkpoint could be written either ({exc}); {_last_good(run.checkpoints)}"
    return (f"the {run.state.step} trained steps are kept in checkpoint {path}: free space, then --resume writes "
            "the adapter")


def finish(run: Run) -> dict[str, Any]:
    """Evaluate the trained adapter, save it, and write metrics, plot and report; returns the summary."""
    session, out, config, processes = run.session, run.out, run.session.config, run.session.processes
    after, samples_after = session.evaluate(full=True)
    if after:
        run.record({"kind": "eval", "step": run.state.step, **after})
    with processes.full_parameters(session.model):
        if processes.is_main:
            try:
                save_adapter(session.model, out / "adapter", ADAPTER)
            except WriteError as exc:  # the trained steps must survive a full disk: in a checkpoint, if one fits
                raise WriteError(f"{exc}; {_kept_in_checkpoint(run)}") from exc
    summary = run_summary(run, after, samples_after)
    if processes.is_main:
        write_metrics(out / "metrics.json", summary)
        plot_history(out / "plot.png", run.state.history, f"{config.model.name} on {config.data.train}")
        write_report(out / "report.md", summary, config_to_yaml(config))
    if run.board:
        run.board.close()
    return summary


def run_summary(run: Run, after: dict[str, Any], samples_after: list[dict[str, str]]) -> dict[str, Any]:
    session, state, config = run.session, run.state, run.session.config
    count = trainable_parameters(session.model)
    return {
        "model": config.model.name, "task": config.model.task, "precision": session.precision,
        "steps": state.step, "stopped_early": state.stopped_early,
        "global_batch": {"examples": global_batch(config.train, session.processes.world),
                         "per_process": config.train.batch_size, "processes": session.processes.world,
                         "grad_accum": config.train.grad_accum},
        "trainable_parameters": count.trainable, "total_parameters": count.total,
        "trainable_fraction": count.fraction,
        "train_seconds": state.seconds, "tokens_per_second": state.tokens / max(state.seconds, 1e-9),
        "peak_rss_mb": peak_rss_mb(), "gradient_checkpointing": session.checkpointing_note,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "data": {"train": config.data.train, **session.data.info},
        "before": run.before, "after": after, "samples_before": run.samples_before, "samples_after": samples_after,
        "adapter_dir": str(run.out / "adapter"),
    }


def evaluate_run(config: RunConfig, adapter: str | Path | None = None, quiet: bool | None = None) -> dict[str, Any]:
    """Evaluate the base model with a saved adapter (default: the run's own) on the config's evaluation data."""
    session = prepare(config, _quiet(quiet), Path(adapter) if adapter else Path(config.output_dir) / "adapter")
    metrics, _ = session.evaluate(full=True)
    return metrics


# --- helpers of the steps ------------------------------------------------------------------------------------
def _open_run(run: Run) -> Run:
    """Write the history so far and the config, and open TensorBoard: the files a run appends to (rank 0);
    then make the module the steps train through (DDP or FSDP under torchrun)."""
    session = run.session
    if session.processes.is_main:
        write_text_atomic(run.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in run.state.history))
        write_text_atomic(run.out / "config.yaml", config_to_yaml(session.config))
        run.board = _tensorboard(run.out)
    task, chunk = session.config.model.task, session.loss_chunk
    run.trainer = session.processes.training_module(
        session.model, lambda model, batch, prefix=0: batch_loss(model, batch, task, chunk, prefix),
        session.config.train.distributed)
    if session.processes.sharded:  # sharding replaced the parameters the optimizer was built over
        run.optimizer, run.scheduler = _optimizer(session)
    return run


def _scale_gradients(model: torch.nn.Module, factor: float) -> None:
    with torch.no_grad():
        for param in model.parameters():
            if param.grad is not None:
                param.grad.mul_(factor)


def read_latest_checkpoint(session: Session, out: Path) -> dict[str, Any]:
    """Load the newest complete checkpoint's adapter into the model and return its trainer state, after
    checking it belongs to this run and keeps its global batch."""
    checkpoints = out / "checkpoints"
    if session.config.train.distributed == "fsdp":
        raise ConfigError("--resume: fsdp runs cannot resume yet; resume with train.distributed: ddp")
    found, saved, passed_over = load_newest_readable(checkpoints, session.model, ADAPTER)
    for warning in passed_over:
        print(f"loratune: warning: {warning}", file=sys.stderr)
    check_same_run(saved.get("config", {}), session.config.model_dump(mode="json"), found)
    check_global_batch(saved, session.config.train, session.processes.world, found)
    return saved


def _optimizer(session: Session) -> tuple[torch.optim.Optimizer, Any]:
    tc = session.config.train
    optimizer = build_optimizer(session.model, tc.learning_rate, tc.weight_decay, tc.lora_plus_ratio)
    return optimizer, build_scheduler(optimizer, tc.warmup_steps, tc.max_steps, tc.schedule)


def _due(every: int | None, step: int) -> bool:
    return bool(every) and step % every == 0


def _quiet(quiet: bool | None) -> bool:
    return (not sys.stderr.isatty()) if quiet is None else quiet


def check_same_run(saved: dict[str, Any], current: dict[str, Any], where: Path, prefix: str = "") -> None:
    """Resume only the run that wrote the checkpoint (the output folder may differ, and so may the process
    count with the accumulation: `read_latest_checkpoint` checks that the global batch stays the same)."""
    for key in sorted(set(saved) | set(current)):
        if f"{prefix}{key}" in RESUMABLE_CHANGES:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            check_same_run(a, b, where, f"{prefix}{key}.")
        elif a != b:
            raise LoratuneError(f"{where}: checkpoint was written with {prefix}{key}={a!r}, the config now says "
                                f"{b!r}; resume with the same config or start a new output_dir")


def _last_good(checkpoints: Path) -> str:
    found = latest_checkpoint(checkpoints)
    return f"last good checkpoint: {found}" if found else "no checkpoint was written yet"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))
