"""One training run as a recipe that reads top to bottom: set up (or resume), then repeat one step with an
evaluation and a checkpoint when due, then evaluate, save the adapter and write the report.

`fit(config)` is what `loratune train` calls; a library user can call it too, or reuse its steps.
"""

from __future__ import annotations

import dataclasses
import json
import random
import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from loratune.core.adapters import trainable_parameters
from loratune.core.atomic_write import write_text_atomic
from loratune.core.errors import ConfigError, LoratuneError
from loratune.core.peft_format import save_adapter
from loratune.data import load_datasets, read_label_names
from loratune.data.packing import length_grouped
from loratune.precision import base_dtype, resolve_precision
from loratune.pretrained import load_adapted_model, max_positions
from loratune.quant.linear import set_base_compute
from loratune.train.batches import BatchMaker
from loratune.train.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from loratune.train.evaluate import evaluate_loss, generate_texts, generation_metrics
from loratune.train.label_scoring import scored_labels
from loratune.train.memory import estimate_memory, machine_memory, memory_warning
from loratune.train.optim import build_optimizer, build_scheduler
from loratune.train.report import plot_history, write_metrics, write_report
from loratune.train.run_config import RunConfig, config_to_yaml
from loratune.train.step import batch_loss

ADAPTER = "default"


class TrainingDiverged(LoratuneError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass
class Session:
    """Everything a run works with once the model, adapter and data are ready."""

    config: RunConfig
    model: torch.nn.Module
    tokenizer: Any
    data: Any
    device: torch.device
    precision: str
    progress: Any
    loss_chunk: int = 0

    @property
    def batches(self) -> BatchMaker:
        return BatchMaker(self.config.train.batching, self.config.model.task, self.tokenizer.pad_token_id,
                          self.config.gradient_checkpointing)

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def evaluate(self, full: bool) -> tuple[dict[str, Any], list[dict[str, str]]]:
        """Loss metrics on the evaluation split; with `full`, also metrics on generated answers and samples."""
        tc, task, data = self.config.train, self.config.model.task, self.data
        if not data.eval_examples:  # nothing held out: report no numbers rather than invented ones
            return {}, []
        metrics = evaluate_loss(self.model, data.eval_examples, task, tc.eval_batch_size,
                                self.tokenizer.pad_token_id, self.device, self.autocast, self.progress,
                                self.loss_chunk, self.batches)
        samples, outputs = [], None
        scored = data.label_answers if tc.label_scoring and task == "causal-lm" else None
        if full and data.eval_prompts and scored:
            outputs = scored_labels(self.model, data.eval_prompts, scored, data.label_names, tc.eval_batch_size,
                                    self.tokenizer.pad_token_id, self.device, self.autocast, self.progress)
            metrics.update(generation_metrics(outputs, data.eval_references, data.label_names))
        generate = tc.generation_eval if tc.generation_eval is not None else not scored
        if full and data.eval_prompts and task != "classification" and generate:
            outputs = generate_texts(self.model, self.tokenizer, data.eval_prompts, tc.max_new_tokens,
                                     tc.eval_batch_size, self.device, self.autocast, self.progress)
            found = generation_metrics(outputs, data.eval_references, data.label_names)
            metrics.update({f"generation_{k}": v for k, v in found.items()} if scored else found)
        if outputs is not None:
            samples = [{"prompt": self.tokenizer.decode(p, skip_special_tokens=True), "output": o, "reference": r}
                       for p, o, r in zip(data.eval_prompts, outputs, data.eval_references)][: tc.num_samples]
        self.model.train()
        return metrics, samples


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

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    def record(self, entry: dict[str, Any]) -> None:
        """Add an entry to the history, `metrics.jsonl` and TensorBoard (when installed)."""
        self.state.history.append(entry)
        with (self.out / "metrics.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
        if self.board:
            for key, value in entry.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.board.add_scalar(f"{entry['kind']}/{key}", value, entry["step"])


# --- the recipe ----------------------------------------------------------------------------------------------
def fit(config: RunConfig, resume: bool = False, quiet: bool | None = None) -> dict[str, Any]:
    """Train one LoRA adapter as `config` says and write everything into `config.output_dir`."""
    out, tc = Path(config.output_dir), config.train
    check_output_dir(out, resume)
    session = prepare(config, _quiet(quiet))
    out.mkdir(parents=True, exist_ok=True)
    run = resume_run(session, out) if resume else start_run(session, out)
    session.model.train()
    lengths = [len(e["input_ids"]) for e in session.data.train_examples] if tc.length_grouped else None
    order = BatchOrder(len(session.data.train_examples), tc.batch_size, tc.seed, lengths)
    progress = session.progress(total=tc.max_steps, initial=run.state.step, desc="training")
    try:
        while run.state.step < tc.max_steps and not run.state.stopped_early:
            train_step(run, order, progress)
            if _due(tc.eval_every, run.state.step) and session.data.eval_examples and run.state.step < tc.max_steps:
                evaluate_during_training(run)
            if _due(tc.checkpoint_every, run.state.step):
                save_run_checkpoint(run)
    finally:
        progress.close()
    return finish(run)


def prepare(config: RunConfig, quiet: bool, adapter_dir: Path | None = None) -> Session:
    """Load model and data, then add a fresh adapter (or load `adapter_dir`); the base stays frozen."""
    tc, spec = config.train, config.model
    seed_everything(tc.seed)
    data_config = config.data
    label_names = read_label_names(data_config) if spec.task == "classification" else None
    if label_names:  # fix the order once, so the head and the examples agree
        data_config = data_config.model_copy(update={"label_names": label_names})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(tc.precision, device)
    if device.type == "cpu":
        _warn_if_too_big(config)
    int8_compute = tc.base_compute == "int8"  # needs int8 storage: the weights per output channel, once
    model, tokenizer = load_adapted_model(
        spec.name, spec.task, config.lora, ADAPTER, adapter_dir=adapter_dir,
        quantize="int8" if int8_compute and spec.quantize == "none" else spec.quantize,
        double_quant=spec.double_quant, loftq_iterations=spec.loftq_iterations, label_names=label_names,
        dtype=base_dtype(spec.dtype, precision), trust_remote_code=spec.trust_remote_code)
    limit = max_positions(model)
    if limit is not None and data_config.max_length > limit and not model.config.is_encoder_decoder:
        raise ConfigError(f"data.max_length={data_config.max_length} exceeds the {limit} positions of {spec.name}")
    if int8_compute:
        set_base_compute(model, "int8")
    if spec.attn_implementation:
        model.set_attn_implementation(spec.attn_implementation)
    data = load_datasets(data_config, tokenizer, spec.task)
    model.to(device)
    _set_gradient_checkpointing(model, config)
    return Session(config, model, tokenizer, data, device, precision, _progress_factory(quiet), config.loss_chunk)


def start_run(session: Session, out: Path) -> Run:
    """A fresh run: new optimizer, and the "before" evaluation as the history's first entry."""
    optimizer, scheduler = _optimizer(session)
    before, samples_before = session.evaluate(full=True)
    state = RunState(history=[{"kind": "eval", "step": 0, **before}] if before else [])
    return _open_run(Run(session, out, optimizer, scheduler, state, before, samples_before))


def resume_run(session: Session, out: Path) -> Run:
    """Continue from the newest complete checkpoint: adapter, optimizer, scheduler, state and RNG streams."""
    checkpoints = out / "checkpoints"
    found = latest_checkpoint(checkpoints)
    if found is None:
        raise LoratuneError(f"{checkpoints}: no complete checkpoint to resume from")
    optimizer, scheduler = _optimizer(session)
    saved = load_checkpoint(found, session.model, ADAPTER)
    check_same_run(saved.get("config", {}), session.config.model_dump(mode="json"), found)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(saved["rng"])
    state = RunState(**saved["state"])
    return _open_run(Run(session, out, optimizer, scheduler, state, saved["before"], saved["samples_before"]))


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
    """Forward and backward over the step's micro-batches; returns (mean loss, tokens seen)."""
    session, state = run.session, run.state
    tc, task = session.config.train, session.config.model.task
    loss_sum, tokens = 0.0, 0
    for _ in range(tc.grad_accum):
        examples = [session.data.train_examples[i] for i in order.batch(state.micro)]
        state.micro += 1
        batch, prefix = session.batches.make(examples, session.device)
        with session.autocast():
            loss, _, _ = batch_loss(session.model, batch, task, session.loss_chunk, prefix)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss.item()} at step {state.step + 1}; "
                                   f"{_last_good(run.checkpoints)} (try a lower learning rate)")
        (loss / tc.grad_accum).backward()
        loss_sum += loss.item() / tc.grad_accum
        tokens += int(batch["attention_mask"].sum())
    return loss_sum, tokens


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
    """Write checkpoint `step-N`; refuses weights that are no longer finite (nothing worth resuming)."""
    model, state, config = run.session.model, run.state, run.session.config
    if not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
        raise TrainingDiverged(f"adapter weights became non-finite at step {state.step}; "
                               f"{_last_good(run.checkpoints)} (try a lower learning rate)")
    save_checkpoint(run.checkpoints, state.step, model, ADAPTER, {
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "state": dataclasses.asdict(state), "rng": rng_state(), "before": run.before,
        "samples_before": run.samples_before, "config": config.model_dump(mode="json")},
        config.train.keep_checkpoints)


def finish(run: Run) -> dict[str, Any]:
    """Evaluate the trained adapter, save it, and write metrics, plot and report; returns the summary."""
    session, out, config = run.session, run.out, run.session.config
    after, samples_after = session.evaluate(full=True)
    if after:
        run.record({"kind": "eval", "step": run.state.step, **after})
    save_adapter(session.model, out / "adapter", ADAPTER)
    summary = run_summary(run, after, samples_after)
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
        "trainable_parameters": count.trainable, "total_parameters": count.total,
        "trainable_fraction": count.fraction,
        "train_seconds": state.seconds, "tokens_per_second": state.tokens / max(state.seconds, 1e-9),
        "peak_rss_mb": peak_rss_mb(),
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
    """Write the history so far and the config, and open TensorBoard: the files a run appends to."""
    write_text_atomic(run.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in run.state.history))
    write_text_atomic(run.out / "config.yaml", config_to_yaml(run.session.config))
    run.board = _tensorboard(run.out)
    return run


def _optimizer(session: Session) -> tuple[torch.optim.Optimizer, Any]:
    tc = session.config.train
    optimizer = build_optimizer(session.model, tc.learning_rate, tc.weight_decay, tc.lora_plus_ratio)
    return optimizer, build_scheduler(optimizer, tc.warmup_steps, tc.max_steps, tc.schedule)


def _due(every: int | None, step: int) -> bool:
    return bool(every) and step % every == 0


def _quiet(quiet: bool | None) -> bool:
    return (not sys.stderr.isatty()) if quiet is None else quiet


def _set_gradient_checkpointing(model: torch.nn.Module, config: RunConfig) -> None:
    supported = getattr(model, "supports_gradient_checkpointing", False)
    if config.train.gradient_checkpointing and not supported:
        raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} does not support it")
    if config.gradient_checkpointing and supported:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _warn_if_too_big(config: RunConfig) -> None:
    """Say before loading when the run is likely to exhaust the machine's memory."""
    try:
        warning = memory_warning(estimate_memory(config), machine_memory())
    except LoratuneError:
        raise
    except Exception as exc:  # an estimate that cannot be made must not stop a run that can
        warning = f"peak memory could not be estimated ({type(exc).__name__}: {exc})"
    if warning:
        print(f"loratune: warning: {warning}", file=sys.stderr)


def check_output_dir(out: Path, resume: bool) -> None:
    """A fresh run never mixes with an earlier run's checkpoints; resuming needs them."""
    if out.exists() and not out.is_dir():
        raise LoratuneError(f"output_dir {out} exists and is not a folder")
    if not resume and latest_checkpoint(out / "checkpoints") is not None:
        raise LoratuneError(f"output_dir {out} holds checkpoints of an earlier run; use --resume to continue it, "
                            "or choose another output_dir")


def check_same_run(saved: dict[str, Any], current: dict[str, Any], where: Path, prefix: str = "") -> None:
    """Resume only the run that wrote the checkpoint (the output folder may differ)."""
    for key in sorted(set(saved) | set(current)):
        if key == "output_dir" and not prefix:
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class BatchOrder:
    """Which examples form micro-batch k: a fresh seeded shuffle each epoch, so resuming needs only k."""

    def __init__(self, size: int, batch_size: int, seed: int, lengths: list[int] | None = None) -> None:
        if size == 0:
            raise LoratuneError("no training examples after loading the data")
        self.size, self.batch_size, self.seed, self.lengths = size, min(batch_size, size), seed, lengths
        self.per_epoch = self.size // self.batch_size
        self._epoch, self._perm = -1, None

    def batch(self, k: int) -> list[int]:
        epoch, index = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=generator).tolist()
            if self.lengths is not None:
                self._perm = length_grouped(self._perm, self.lengths, self.batch_size)
        return self._perm[index * self.batch_size:(index + 1) * self.batch_size]


def _progress_factory(quiet: bool):
    def make(iterable=None, **kwargs):
        return tqdm(iterable, disable=quiet, leave=False, dynamic_ncols=True, **kwargs)
    return make


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))
