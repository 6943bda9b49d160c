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

from loratune.allocator import active_malloc
from loratune.batching import BatchOrder
from loratune.core.adapters import trainable_parameters
from loratune.core.atomic_write import write_text_atomic
from loratune.core.errors import ConfigError, LoratuneError, WriteError
from loratune.errors import ReportedByAnotherRank
from loratune.quant.widen import widened_dtype
from loratune.train.auto_lr import CHOICE_NAME, chosen_config, read_choice, resolve_learning_rate
from loratune.train.checkpoint import (
    OPTIMIZER_SHARDS,
    latest_checkpoint,
    load_newest_readable,
    load_optimizer_shards,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from loratune.train.distributed import check_global_batch, global_batch, join_processes
from loratune.train.evaluate import Evaluation
from loratune.train.methods import save_trained, trained_folder
from loratune.train.optim import build_optimizer, build_scheduler
from loratune.train.processes import Processes
from loratune.train.report import plot_history, write_metrics, write_report
from loratune.train.run_config import RunConfig, config_to_yaml
from loratune.train.run_folder import claim_output_dir
from loratune.train.run_step import (
    Run,
    RunState,
    TrainingDiverged,
    batch_order,
    last_good,
    optimizer_step,
    trainer_for,
)
from loratune.train.session import ADAPTER, Session, prepare
from loratune.train.stop_signals import RunStopped, stop_requests

# Keys a resumed run may change: where it writes, and how the same global batch is split over processes,
# micro-batches and accumulation (`check_global_batch` keeps the global batch itself).
RESUMABLE_CHANGES = {"output_dir", "train.batch_size", "train.grad_accum", "train.distributed",
                     "train.distributed_timeout"}


# --- the recipe ----------------------------------------------------------------------------------------------
def fit(config: RunConfig, resume: bool = False, quiet: bool | None = None,
        processes: Processes | None = None) -> dict[str, Any]:
    """Train one LoRA adapter as `config` says and write everything into `config.output_dir`.

    Under torchrun every process calls this; `processes` (default: join torchrun's group, if any, as
    `train.distributed` says) answers where one process and many differ, and only rank 0 writes.
    """
    own_processes = processes is None
    processes = processes or join_processes(config.train.distributed_timeout, config.train.distributed)
    try:
        return _fit(config, resume, _quiet(quiet) or not processes.is_main, processes)
    except RunStopped as stop:  # rank 0 says how to go on; the other ranks end without a second message
        if processes.is_main:
            raise
        raise ReportedByAnotherRank(str(stop)) from None
    finally:
        if own_processes:
            processes.close()


def _fit(config: RunConfig, resume: bool, quiet: bool, processes: Processes) -> dict[str, Any]:
    out, tc = Path(config.output_dir), config.train
    with ExitStack() as folder, stop_requests() as stops:
        def stopping() -> bool:  # a stop signal on any rank stops every rank after the same step
            return processes.any(stops.requested)

        processes.on_main(lambda: _claim(folder, out, resume))  # a refusal is said once
        resume = resume and processes.on_main(lambda: _has_checkpoint(out, config))
        session = processes.agree(lambda: prepare(config, quiet, processes=processes))
        # train.learning_rate: auto, chosen on the training split (a stop signal ends the search too)
        if not processes.agree(lambda: resolve_learning_rate(session, out, stopping)) or stopping():
            raise RunStopped(stops.signal_name, 0, None)
        run = resume_run(session, out) if resume else start_run(session, out)
        session.model.train()
        order = batch_order(session)
        progress = session.progress(total=tc.max_steps, initial=run.state.step, desc="training")
        try:
            while run.state.step < tc.max_steps and not run.state.stopped_early and not stopping():
                train_step(run, order, progress)
                if _due(tc.eval_every, run.state.step) and session.data.eval_examples and run.state.step < tc.max_steps:
                    evaluate_during_training(run)
                if _due(tc.checkpoint_every, run.state.step):
                    save_run_checkpoint(run)
        finally:
            progress.close()
        if stopping():  # between steps: keep the progress, then say how to go on
            raise RunStopped(stops.signal_name, run.state.step, checkpoint_now(run))
        return finish(run)


def _claim(folder: ExitStack, out: Path, resume: bool) -> None:
    """The output folder is this run's (lock, emptiness, leftovers) until the run ends."""
    folder.enter_context(claim_output_dir(out, resume))


def _has_checkpoint(out: Path, config: RunConfig) -> bool:
    """Whether `--resume` has a checkpoint to continue from. A run stopped before its first checkpoint (its
    own config.yaml is there, no checkpoint yet) starts again from step 0 with a warning, which equals an
    uninterrupted run; a folder that holds neither is an error, as is another run's config."""
    checkpoints, saved = out / "checkpoints", out / "config.yaml"
    if latest_checkpoint(checkpoints) is not None:
        return True
    if not saved.is_file() and not (out / CHOICE_NAME).is_file():  # (stopped between the rate search and step 0)
        raise LoratuneError(f"{checkpoints}: no complete checkpoint to resume from")
    if saved.is_file() and saved.read_text(encoding="utf-8") != config_to_yaml(chosen_config(config, out)):
        raise LoratuneError(f"output_dir {out} holds another run's config.yaml and no checkpoint; choose "
                            "another output_dir")
    print(f"loratune: warning: {checkpoints}: no complete checkpoint yet; starting again from step 0",
          file=sys.stderr)
    return False


def start_run(session: Session, out: Path) -> Run:
    """A fresh run: the module a step trains through, the optimizer over its parameters, and the "before"
    evaluation as the history's first entry."""
    trainer = trainer_for(session)
    optimizer, scheduler = _optimizer(session)
    before = session.evaluate()
    session.processes.seed_rank(session.config.train.seed)
    state = RunState(history=[{"kind": "eval", "step": 0, **before.metrics}] if before.metrics else [])
    return _open_run(Run(session, out, optimizer, scheduler, state, before.metrics, before.samples, trainer=trainer))


def resume_run(session: Session, out: Path) -> Run:
    """Continue from the newest readable checkpoint (newer unreadable ones are passed over with a warning):
    adapter, optimizer, scheduler, state and RNG streams.

    Rank 0 reads it and sends it to the others, so the output folder need not be shared between machines;
    only an FSDP run's optimizer shards are read by every rank (its checkpoints are in a folder all reach).
    """
    saved = session.processes.on_main(lambda: read_latest_checkpoint(session, out))
    trainer = trainer_for(session)  # under torchrun this sends rank 0's resumed adapter to every rank
    optimizer, scheduler = _optimizer(session)
    if "optimizer" in saved:
        optimizer.load_state_dict(saved["optimizer"])
    else:
        session.processes.agree(lambda: load_optimizer_shards(Path(saved["path"]) / OPTIMIZER_SHARDS,
                                                              session.model, optimizer))
    scheduler.load_state_dict(saved["scheduler"])
    rng = session.processes.rank_rng(saved, session.config.train.seed)
    if rng is not None:
        set_rng_state(rng)
    fields = {f.name for f in dataclasses.fields(RunState)}  # older checkpoints also counted micro-batches
    state = RunState(**{key: value for key, value in saved["state"].items() if key in fields})
    return _open_run(Run(session, out, optimizer, scheduler, state, saved["before"], saved["samples_before"],
                         trainer=trainer))


def train_step(run: Run, order: BatchOrder, progress: Any) -> None:
    """One optimizer step (`run_step.optimizer_step`); logs loss, learning rate and throughput."""
    state, started = run.state, time.perf_counter()
    loss, tokens, lr = optimizer_step(run, order)
    elapsed = time.perf_counter() - started
    state.tokens += tokens
    state.seconds += elapsed
    run.record({"kind": "train", "step": state.step, "loss": loss, "lr": lr, "tokens_per_s": tokens / elapsed})
    progress.update(1)
    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / elapsed:.0f}")


def evaluate_during_training(run: Run) -> None:
    """Loss on the evaluation split; counts evaluations without improvement, for early stopping."""
    state, patience = run.state, run.session.config.train.early_stopping_patience
    metrics = run.session.evaluate(loss_only=True).metrics
    run.record({"kind": "eval", "step": state.step, **metrics})
    if state.best is None or metrics["loss"] < state.best:
        state.best, state.bad_evals = metrics["loss"], 0
    else:
        state.bad_evals += 1
    if patience and state.bad_evals >= patience:
        state.stopped_early = True


def save_run_checkpoint(run: Run) -> None:
    """Write checkpoint `step-N` (every rank: rank 0 writes the files with every rank's RNG stream, and under
    FSDP each rank its shard of the optimizer state); refuses weights that are no longer finite (nothing worth
    resuming)."""
    model, state, config, processes = run.session.model, run.state, run.session.config, run.session.processes
    streams = processes.gather(rng_state())
    local = [getattr(p, "to_local", lambda p=p: p)() for p in model.parameters() if p.requires_grad]
    if processes.any(not all(torch.isfinite(p).all() for p in local)):
        error = TrainingDiverged(f"adapter weights became non-finite at step {state.step}; "
                                 f"{last_good(run.checkpoints)} (try a lower learning rate)")
        raise error if processes.is_main else ReportedByAnotherRank(str(error))
    whole = {} if processes.sharded else {"optimizer": run.optimizer.state_dict()}
    save_checkpoint(run.checkpoints, state.step, model, ADAPTER, {
        **whole, "scheduler": run.scheduler.state_dict(),
        "state": dataclasses.asdict(state), "rng": streams[0], "rank_rng": streams, "processes": len(streams),
        "before": run.before,
        "samples_before": run.samples_before, "config": config.model_dump(mode="json")},
        config.train.keep_checkpoints, processes, run.optimizer if processes.sharded else None)


def checkpoint_now(run: Run) -> Path:
    """The checkpoint of the run's current step, written now unless it already exists (rank 0 decides: only
    its folder is sure to hold the checkpoints)."""
    path = run.checkpoints / f"step-{run.state.step}"
    if run.session.processes.on_main(lambda: getattr(latest_checkpoint(run.checkpoints), "name", None)) == path.name:
        return path
    save_run_checkpoint(run)
    return path


def _kept_in_checkpoint(run: Run) -> str:
    """Say where the run's progress is after the final adapter could not be written (rank 0 alone gets here,
    so under torchrun no new checkpoint, which needs every rank, is tried)."""
    if run.session.processes.world > 1:
        return last_good(run.checkpoints)
    try:
        path = checkpoint_now(run)
    except WriteError as exc:
        return f"no checkpoint could be written either ({exc}); {last_good(run.checkpoints)}"
    return (f"the {run.state.step} trained steps are kept in checkpoint {path}: free space, then --resume writes "
            "the adapter")


def finish(run: Run) -> dict[str, Any]:
    """Evaluate the trained adapter, save it, and write metrics, plot and report; returns the summary."""
    session, out, config, processes = run.session, run.out, run.session.config, run.session.processes
    after = session.evaluate()
    if after.metrics:
        run.record({"kind": "eval", "step": run.state.step, **after.metrics})
    with processes.full_parameters(session.model):
        if processes.is_main:
            try:
                save_trained(session.model, session.tokenizer, out, config.method, ADAPTER)
            except WriteError as exc:  # the trained steps must survive a full disk: in a checkpoint, if one fits
                raise WriteError(f"{exc}; {_kept_in_checkpoint(run)}") from exc
    summary = run_summary(run, after)
    if processes.is_main:
        write_metrics(out / "metrics.json", summary)
        plot_history(out / "plot.png", run.state.history, f"{config.model.name} on {config.data.train}")
        write_report(out / "report.md", summary, config_to_yaml(config))
    if run.board:
        run.board.close()
    return summary


def run_summary(run: Run, after: Evaluation) -> dict[str, Any]:
    session, state, config, world = run.session, run.state, run.session.config, run.session.processes.world
    count = trainable_parameters(session.model)
    return {
        "model": config.model.name, "task": config.model.task, "precision": session.precision,
        "widened_from": _dtype_name(widened_dtype(session.model)),
        "steps": state.step, "stopped_early": state.stopped_early,
        "global_batch": {"examples": global_batch(config.train, world), "per_process": config.train.batch_size,
                         "processes": world,
                         "grad_accum": config.train.grad_accum},
        "trainable_parameters": count.trainable, "total_parameters": count.total,
        "trainable_fraction": count.fraction,
        "train_seconds": state.seconds, "tokens_per_second": state.tokens / max(state.seconds, 1e-9),
        "peak_rss_mb": peak_rss_mb(), "malloc": active_malloc(), "gradient_checkpointing": session.checkpointing_note,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "data": {"train": config.data.train, **session.data.info},
        "before": run.before, "after": after.metrics, "samples_before": run.samples_before,
        "samples_after": after.samples,
        "learning_rate_choice": read_choice(run.out),
        "method": config.method, "adapter_dir": str(trained_folder(run.out, config.method)),
    }


def evaluate_run(config: RunConfig, adapter: str | Path | None = None, quiet: bool | None = None) -> dict[str, Any]:
    """Evaluate the base model with a saved adapter (default: the run's own) on the config's evaluation data."""
    saved = Path(adapter) if adapter else trained_folder(Path(config.output_dir), config.method)
    session = prepare(config, _quiet(quiet), saved)
    return session.evaluate().metrics


# --- helpers of the steps ------------------------------------------------------------------------------------
def _open_run(run: Run) -> Run:
    """Write the history so far and the config, and open TensorBoard: the files a run appends to (rank 0)."""
    if run.session.processes.is_main:
        write_text_atomic(run.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in run.state.history))
        write_text_atomic(run.out / "config.yaml", config_to_yaml(run.session.config))
        run.board = _tensorboard(run.out)
    return run


def read_latest_checkpoint(session: Session, out: Path) -> dict[str, Any]:
    """Load the newest complete checkpoint's adapter into the model and return its trainer state, after
    checking it belongs to this run and keeps its global batch."""
    checkpoints = out / "checkpoints"
    found, saved, passed_over = load_newest_readable(checkpoints, session.model, ADAPTER)
    for warning in passed_over:
        print(f"loratune: warning: {warning}", file=sys.stderr)
    check_same_run(saved.get("config", {}), session.config.model_dump(mode="json"), found)
    check_global_batch(saved, session.config.train, session.processes.world, found)
    if session.processes.sharded and "optimizer" in saved:
        raise ConfigError(f"{found}: written by a ddp or one-process run; resume it with train.distributed: ddp "
                          "(an fsdp run resumes checkpoints written by fsdp runs)")
    return {**saved, "path": str(found)}


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


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))
