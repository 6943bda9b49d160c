"""A training session: the model with its adapter, the tokenizer, the data, the device and the precision,
made ready by `prepare`, and the evaluation every part of a run uses (before, during and after training,
and `loratune eval`)."""

from __future__ import annotations

import dataclasses
import functools
import random
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from loratune.core.errors import ConfigError, LoratuneError, TargetError
from loratune.data import load_datasets, read_label_names
from loratune.precision import base_dtype, cpu_choice, resolve_precision
from loratune.pretrained import load_adapted_model, max_positions
from loratune.quant.allocator import release_free_memory
from loratune.quant.linear import set_base_compute
from loratune.train.batches import BatchMaker
from loratune.train.distributed import Processes
from loratune.train.evaluate import generate_texts, generation_metrics, loss_metrics, loss_totals
from loratune.train.label_scoring import loss_and_scored_labels, scored_labels, scores_ride_on_loss
from loratune.train.memory import checkpointing_decision, estimate_memory, machine_memory, memory_warning
from loratune.train.run_config import RunConfig

ADAPTER = "default"


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
    processes: Processes = dataclasses.field(default_factory=Processes)
    checkpointing: bool = False
    checkpointing_note: str = "off"  # on or off, and why (the run's log line and report say it)

    @functools.cached_property
    def batches(self) -> BatchMaker:  # one per run: the training step asks for it per micro-batch
        return BatchMaker(self.config.train.batching, self.config.model.task, self.tokenizer.pad_token_id,
                          self.checkpointing)

    @functools.cached_property
    def unpacked_batches(self) -> BatchMaker:  # a batch whose rows are its examples, for reading positions
        if self.batches.batching != "packed":
            return self.batches
        return dataclasses.replace(self.batches, batching="padded")

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def evaluate(self, full: bool) -> tuple[dict[str, Any], list[dict[str, str]]]:
        """Loss metrics on the evaluation split; with `full`, also metrics on generated answers and samples.

        Under torchrun each rank evaluates its share and every rank gets the same merged metrics."""
        tc, task, data, processes = self.config.train, self.config.model.task, self.data, self.processes
        if not data.eval_examples:  # nothing held out: report no numbers rather than invented ones
            return {}, []
        examples, prompts = processes.shard(data.eval_examples), processes.shard(data.eval_prompts)
        scored = data.label_answers if tc.label_scoring and task == "causal-lm" else None
        outputs = None
        # one pass for loss and labels, decided on the whole split so that every rank takes the same path
        if full and scored and scores_ride_on_loss(data.eval_examples, data.eval_prompts, scored):
            totals, chosen = loss_and_scored_labels(
                self.model, examples, prompts, scored, data.label_names, tc.eval_batch_size, self.unpacked_batches,
                self.device, self.autocast, self.progress, self.loss_chunk)
            outputs = processes.unshard(chosen)
        else:
            totals = loss_totals(self.model, examples, task, tc.eval_batch_size, self.tokenizer.pad_token_id,
                                 self.device, self.autocast, self.progress, self.loss_chunk, self.batches)
            if full and data.eval_prompts and scored:
                outputs = processes.unshard(scored_labels(
                    self.model, prompts, scored, data.label_names, tc.eval_batch_size, self.tokenizer.pad_token_id,
                    self.device, self.autocast, self.progress))
        metrics = loss_metrics(processes.total(totals), task)
        samples = []
        if outputs is not None:
            metrics.update(generation_metrics(outputs, data.eval_references, data.label_names))
        generate = tc.generation_eval if tc.generation_eval is not None else not scored
        if full and data.eval_prompts and task != "classification" and generate:
            outputs = processes.unshard(generate_texts(
                self.model, self.tokenizer, prompts, tc.max_new_tokens,
                tc.eval_batch_size, self.device, self.autocast, self.progress))
            found = generation_metrics(outputs, data.eval_references, data.label_names)
            metrics.update({f"generation_{k}": v for k, v in found.items()} if scored else found)
        if outputs is not None:
            samples = [{"prompt": self.tokenizer.decode(p, skip_special_tokens=True), "output": o, "reference": r}
                       for p, o, r in zip(data.eval_prompts, outputs, data.eval_references)][: tc.num_samples]
        self.model.train()
        release_free_memory()  # the evaluation batches' blocks, so training does not stack on them
        return metrics, samples


def prepare(config: RunConfig, quiet: bool, adapter_dir: Path | None = None,
            processes: Processes | None = None) -> Session:
    """Load model and data, then add a fresh adapter (or load `adapter_dir`); the base stays frozen."""
    tc, spec = config.train, config.model
    processes = processes or Processes()
    seed_everything(tc.seed)
    data_config = config.data
    label_names = read_label_names(data_config) if spec.task == "classification" else None
    if label_names:  # fix the order once, so the head and the examples agree
        data_config = data_config.model_copy(update={"label_names": label_names})
    device = processes.device
    precision = resolve_precision(tc.precision, device)
    try:  # the memory estimate applies the lora section first, on a skeleton of the model
        checkpointing, note = _memory_plan(config, device, processes.is_main)
        model, tokenizer = load_adapted_model(
            spec.name, spec.task, config.lora, ADAPTER, adapter_dir=adapter_dir, quantize=spec.quantize,
            double_quant=spec.double_quant, loftq_iterations=spec.loftq_iterations, label_names=label_names,
            dtype=base_dtype(spec.dtype, precision), trust_remote_code=spec.trust_remote_code)
    except TargetError as exc:  # name the model the lora section does not fit
        raise TargetError(f"model {spec.name!r}: lora: {exc}") from None
    limit = max_positions(model)
    if limit is not None and data_config.max_length > limit and not model.config.is_encoder_decoder:
        raise ConfigError(f"data.max_length={data_config.max_length} exceeds the {limit} positions of {spec.name}")
    if spec.quantize == "int8" and device.type == "cpu":  # int8 x int8 products where the probe found them faster
        set_base_compute(model, cpu_choice()["int8_base"])
    if spec.attn_implementation:
        model.set_attn_implementation(spec.attn_implementation)
    data = load_datasets(data_config, tokenizer, spec.task)
    model.to(device)
    if checkpointing and not _set_gradient_checkpointing(model, config, checkpointing):
        checkpointing, note = False, f"off ({type(model).__name__} does not support it)"
    release_free_memory()  # what loading and tokenizing freed
    return Session(config, model, tokenizer, data, device, precision, _progress_factory(quiet), config.loss_chunk,
                   processes, checkpointing, note)


def _set_gradient_checkpointing(model: torch.nn.Module, config: RunConfig, wanted: bool) -> bool:
    supported = getattr(model, "supports_gradient_checkpointing", False)
    if config.train.gradient_checkpointing and not supported:
        raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} does not support it")
    if wanted and supported:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return wanted and supported


def _memory_plan(config: RunConfig, device: torch.device, warn: bool) -> tuple[bool, str]:
    """(gradient checkpointing on, why), decided before loading from the memory estimate on a CPU; and a
    warning when even then the run is likely to exhaust the machine's memory. Every process decides alike."""
    explicit = config.train.gradient_checkpointing
    if device.type != "cpu":  # the estimate models a CPU process; on a GPU a quantized base checkpoints
        on = explicit if explicit is not None else config.model.quantize != "none"
        return on, f"{'on' if on else 'off'} ({'train.gradient_checkpointing' if explicit is not None else 'GPU'})"
    warning = None
    try:
        available = machine_memory()
        on, note = checkpointing_decision(config, available)
        warning = memory_warning(estimate_memory(config, on), available)
    except LoratuneError:
        raise
    except Exception as exc:  # an estimate that cannot be made must not stop a run that can
        on, note = bool(explicit), f"{'on' if explicit else 'off'} (memory not estimated)"
        warning = f"peak memory could not be estimated ({type(exc).__name__}: {exc})"
    if warning and warn:
        print(f"loratune: warning: {warning}", file=sys.stderr)
    return on, note


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _progress_factory(quiet: bool):
    def make(iterable=None, **kwargs):
        return tqdm(iterable, disable=quiet, leave=False, dynamic_ncols=True, **kwargs)
    return make
