"""One training run, top to bottom: load, adapt, evaluate, train, checkpoint, evaluate, save, report.

`fit(config)` is what `loratune train` calls; a library user can call it too, or reuse its pieces.
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

from ..data import collate
from ..errors import ConfigError, LoratuneError
from ..io import load_adapter, load_adapter_weights_into, save_adapter, write_text_atomic
from ..model import add_adapter, trainable_parameters
from ..models import load_model, max_positions
from ..quant import quantize_model
from .checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import RunConfig, config_to_yaml
from .evaluate import evaluate_loss, generate_texts, generation_metrics
from .optim import build_optimizer, build_scheduler
from .report import plot_history, write_metrics, write_report
from .step import batch_loss, to_device

ADAPTER = "default"
TASK_TYPES = {"causal-lm": "CAUSAL_LM", "classification": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
                                self.loss_chunk)
        samples = []
        if full and data.eval_prompts and task != "classification" and tc.generation_eval:
            outputs = generate_texts(self.model, self.tokenizer, data.eval_prompts, tc.max_new_tokens,
                                     tc.eval_batch_size, self.device, self.autocast, self.progress)
            metrics.update(generation_metrics(outputs, data.eval_references, data.label_names))
            samples = [{"prompt": self.tokenizer.decode(p, skip_special_tokens=True), "output": o, "reference": r}
                       for p, o, r in zip(data.eval_prompts, outputs, data.eval_references)][: tc.num_samples]
        self.model.train()
        return metrics, samples


def prepare(config: RunConfig, quiet: bool, adapter_dir: Path | None = None) -> Session:
    """Load model and data, then add a fresh adapter (or load `adapter_dir`); the base stays frozen."""
    from ..data import load_datasets, read_label_names

    tc = config.train
    seed_everything(tc.seed)
    data_config = config.data
    label_names = read_label_names(data_config) if config.model.task == "classification" else None
    if label_names:  # fix the order once, so the head and the examples agree
        data_config = data_config.model_copy(update={"label_names": label_names})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(tc.precision, device)
    if device.type == "cpu":
        _warn_if_too_big(config)
    spec = config.model
    loftq = spec.loftq_iterations > 0  # needs the full-precision weights, so quantizes after the adapter exists
    model, tokenizer = load_model(spec.name, spec.task, label_names=label_names,
                                  dtype=base_dtype(spec.dtype, precision), trust_remote_code=spec.trust_remote_code,
                                  quantize="none" if loftq else spec.quantize, double_quant=spec.double_quant)
    limit = max_positions(model)
    if limit is not None and data_config.max_length > limit and not model.config.is_encoder_decoder:
        raise ConfigError(f"data.max_length={data_config.max_length} exceeds the {limit} positions of "
                          f"{config.model.name}")
    if config.model.attn_implementation:
        model.set_attn_implementation(config.model.attn_implementation)
    data = load_datasets(data_config, tokenizer, config.model.task)
    seed_everything(tc.seed)
    if adapter_dir is not None and not loftq:
        load_adapter(model, adapter_dir, ADAPTER)
    else:
        lora = dataclasses.replace(config.lora, task_type=config.lora.task_type or TASK_TYPES[config.model.task],
                                   base_model_name_or_path=config.lora.base_model_name_or_path or config.model.name)
        add_adapter(model, lora, ADAPTER)
    if loftq:  # LoftQ makes the quantized base and the adapter's start together (seeded): rebuild, then load
        quantize_model(model, spec.quantize, spec.double_quant, spec.loftq_iterations, ADAPTER)
        if adapter_dir is not None:
            load_adapter_weights_into(model, adapter_dir, ADAPTER)
    model.to(device)
    supported = getattr(model, "supports_gradient_checkpointing", False)
    if tc.gradient_checkpointing and not supported:
        raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} does not support it")
    if config.gradient_checkpointing and supported:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return Session(config, model, tokenizer, data, device, precision, _progress_factory(quiet), config.loss_chunk)


def _warn_if_too_big(config: RunConfig) -> None:
    """Say before loading when the run is likely to exhaust the machine's memory."""
    from ..memory import estimate_memory, machine_memory, memory_warning

    try:
        warning = memory_warning(estimate_memory(config), machine_memory())
    except LoratuneError:
        raise
    except Exception as exc:  # an estimate that cannot be made must not stop a run that can
        warning = f"peak memory could not be estimated ({type(exc).__name__}: {exc})"
    if warning:
        print(f"loratune: warning: {warning}", file=sys.stderr)


def evaluate_run(config: RunConfig, adapter: str | Path | None = None, quiet: bool | None = None) -> dict[str, Any]:
    """Evaluate the base model with a saved adapter (default: the run's own) on the config's evaluation data."""
    quiet = (not sys.stderr.isatty()) if quiet is None else quiet
    session = prepare(config, quiet, Path(adapter) if adapter else Path(config.output_dir) / "adapter")
    metrics, _ = session.evaluate(full=True)
    return metrics


def fit(config: RunConfig, resume: bool = False, quiet: bool | None = None) -> dict[str, Any]:
    """Train one LoRA adapter as `config` says and write everything into `config.output_dir`."""
    out = Path(config.output_dir)
    tc, task = config.train, config.model.task
    checkpoints = out / "checkpoints"
    check_output_dir(out, resume)
    quiet = (not sys.stderr.isatty()) if quiet is None else quiet
    session = prepare(config, quiet)
    out.mkdir(parents=True, exist_ok=True)
    model, data, device = session.model, session.data, session.device
    autocast, precision = session.autocast, session.precision
    optimizer = build_optimizer(model, tc.learning_rate, tc.weight_decay, tc.lora_plus_ratio)
    scheduler = build_scheduler(optimizer, tc.warmup_steps, tc.max_steps, tc.schedule)
    pad_id = session.tokenizer.pad_token_id
    evaluate = session.evaluate

    # 3. Fresh start or resume.
    state = {"step": 0, "micro": 0, "history": [], "best": None, "bad_evals": 0, "tokens": 0, "seconds": 0.0}
    if resume:
        found = latest_checkpoint(checkpoints)
        if found is None:
            raise LoratuneError(f"{checkpoints}: no complete checkpoint to resume from")
        saved = load_checkpoint(found, model, ADAPTER)
        check_same_run(saved.get("config", {}), config.model_dump(mode="json"), found)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
        before, samples_before = saved["before"], saved["samples_before"]
        set_rng_state(saved["rng"])
    else:
        before, samples_before = evaluate(full=True)
        if before:
            state["history"].append({"kind": "eval", "step": 0, **before})
    log_path = out / "metrics.jsonl"
    write_text_atomic(log_path, "".join(json.dumps(r) + "\n" for r in state["history"]))
    write_text_atomic(out / "config.yaml", config_to_yaml(config))
    board = _tensorboard(out)

    # 4. Train.
    model.train()
    order = BatchOrder(len(data.train_examples), tc.batch_size, tc.seed)
    progress = session.progress(total=tc.max_steps, initial=state["step"], desc="training")
    stopped_early = False
    while state["step"] < tc.max_steps:
        started = time.perf_counter()
        loss_sum, tokens = 0.0, 0
        for _ in range(tc.grad_accum):
            examples = [data.train_examples[i] for i in order.batch(state["micro"])]
            state["micro"] += 1
            batch = to_device(collate(examples, pad_id, task), device)
            with autocast():
                loss, _, _ = batch_loss(model, batch, task, session.loss_chunk)
            if not torch.isfinite(loss):
                progress.close()
                raise TrainingDiverged(f"loss became {loss.item()} at step {state['step'] + 1}; "
                                       f"{_last_good(checkpoints)} (try a lower learning rate)")
            (loss / tc.grad_accum).backward()
            loss_sum += loss.item() / tc.grad_accum
            tokens += int(batch["attention_mask"].sum())
        if tc.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], tc.max_grad_norm)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        elapsed = time.perf_counter() - started
        state["tokens"] += tokens
        state["seconds"] += elapsed
        record = {"kind": "train", "step": state["step"], "loss": loss_sum, "lr": lr, "tokens_per_s": tokens / elapsed}
        state["history"].append(record)
        _append_line(log_path, record, board)
        progress.update(1)
        progress.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / elapsed:.0f}")

        if tc.eval_every and data.eval_examples and state["step"] % tc.eval_every == 0 and state["step"] < tc.max_steps:
            metrics, _ = evaluate(full=False)
            entry = {"kind": "eval", "step": state["step"], **metrics}
            state["history"].append(entry)
            _append_line(log_path, entry, board)
            if state["best"] is None or metrics["loss"] < state["best"]:
                state["best"], state["bad_evals"] = metrics["loss"], 0
            else:
                state["bad_evals"] += 1
            if tc.early_stopping_patience and state["bad_evals"] >= tc.early_stopping_patience:
                stopped_early = True
        if tc.checkpoint_every and state["step"] % tc.checkpoint_every == 0:
            if not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
                progress.close()  # a checkpoint must hold weights worth resuming from
                raise TrainingDiverged(f"adapter weights became non-finite at step {state['step']}; "
                                       f"{_last_good(checkpoints)} (try a lower learning rate)")
            save_checkpoint(checkpoints, state["step"], model, ADAPTER, {
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "state": state,
                "rng": rng_state(), "before": before, "samples_before": samples_before,
                "config": config.model_dump(mode="json")}, tc.keep_checkpoints)
        if stopped_early:
            break
    progress.close()

    # 5. Evaluate, save, report.
    after, samples_after = evaluate(full=True)
    if after:
        state["history"].append({"kind": "eval", "step": state["step"], **after})
        _append_line(log_path, state["history"][-1], board)
    save_adapter(model, out / "adapter", ADAPTER)
    count = trainable_parameters(model)
    summary = {
        "model": config.model.name, "task": task, "precision": precision,
        "steps": state["step"], "stopped_early": stopped_early,
        "trainable_parameters": count.trainable, "total_parameters": count.total,
        "trainable_fraction": count.fraction,
        "train_seconds": state["seconds"], "tokens_per_second": state["tokens"] / max(state["seconds"], 1e-9),
        "peak_rss_mb": peak_rss_mb(),
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "data": {"train": config.data.train, **data.info},
        "before": before, "after": after, "samples_before": samples_before, "samples_after": samples_after,
        "adapter_dir": str(out / "adapter"),
    }
    write_metrics(out / "metrics.json", summary)
    plot_history(out / "plot.png", state["history"], f"{config.model.name} on {config.data.train}")
    write_report(out / "report.md", summary, config_to_yaml(config))
    if board:
        board.close()
    return summary


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


def resolve_precision(requested: str, device: torch.device) -> str:
    """bf16 autocast on CUDA with bf16 support or on CPUs with native bf16 (AMX / AVX512-BF16)."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def base_dtype(requested: str, precision: str) -> torch.dtype:
    """Frozen weights in bf16 when the matmuls run in bf16 anyway: autocast then has nothing to cast, and
    the weights take half the memory. Adapter weights stay fp32 (they are created in fp32)."""
    if requested == "auto":
        return torch.bfloat16 if precision == "bf16" else torch.float32
    return DTYPES[requested]


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class BatchOrder:
    """Which examples form micro-batch k: a fresh seeded shuffle each epoch, so resuming needs only k."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        if size == 0:
            raise LoratuneError("no training examples after loading the data")
        self.size, self.batch_size, self.seed = size, min(batch_size, size), seed
        self.per_epoch = self.size // self.batch_size
        self._epoch, self._perm = -1, None

    def batch(self, k: int) -> list[int]:
        epoch, index = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=generator).tolist()
        return self._perm[index * self.batch_size:(index + 1) * self.batch_size]


def _progress_factory(quiet: bool):
    def make(iterable=None, **kwargs):
        return tqdm(iterable, disable=quiet, leave=False, dynamic_ncols=True, **kwargs)
    return make


def _append_line(path: Path, record: dict[str, Any], board) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    if board:
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                board.add_scalar(f"{record['kind']}/{key}", value, record["step"])


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))
