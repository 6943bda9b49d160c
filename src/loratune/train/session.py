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

from loratune.allocator import release_free_memory
from loratune.batching import BatchMaker, decoder_body, fallback_warning, max_positions
from loratune.batching.read_rows import compute_read_rows_only
from loratune.core.errors import ConfigError, LoratuneError, TargetError
from loratune.data import load_datasets, read_label_names
from loratune.precision import base_dtype, compute_dtype, cpu_choice, resolve_precision
from loratune.quant.linear import set_base_compute
from loratune.train.evaluate import (
    Evaluation,
    Forwards,
    LossTotals,
    generate_texts,
    generation_metrics,
    loss_metrics,
    loss_totals,
)
from loratune.train.forgetting import general_text_metrics
from loratune.train.label_scoring import length_sensitive, scored_labels, scores_ride_on_loss
from loratune.train.memory import (
    checkpointing_decision,
    estimate_memory,
    frozen_dtype,
    machine_memory,
    memory_warning,
)
from loratune.train.methods import load_for_method
from loratune.train.processes import Processes
from loratune.train.run_config import RunConfig
from loratune.train.saved_activations import save_less
from loratune.train.step import split_lm

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
                          self.checkpointing, self.processes.sharded)

    @functools.cached_property
    def unpacked_batches(self) -> BatchMaker:  # a batch whose rows are its examples, for reading positions
        if self.batches.batching != "packed":
            return self.batches
        return dataclasses.replace(self.batches, batching="padded")

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def evaluate(self, *, loss_only: bool = False) -> Evaluation:
        """The evaluation split's loss metrics and, unless `loss_only`, what the data allows on its answers: a
        causal LM whose answers are a known label set gets each prompt's highest-scoring label (accuracy,
        macro-F1); `train.generation_eval` adds generated answers (accuracy, or BLEU and chrF; prefixed
        `generation_` beside label scores). Samples show the last answers found.

        Under torchrun each rank evaluates its share and every rank gets the same result."""
        data, processes, task = self.data, self.processes, self.config.model.task
        if not data.eval_examples:  # nothing held out: report no numbers rather than invented ones
            return Evaluation()
        labels = data.label_answers if task == "causal-lm" and data.eval_prompts and not loss_only else None
        generate = self.config.train.generation_eval
        if labels is not None and split_lm(self.model) is None:  # a head that is not a plain linear layer
            labels, generate = None, True  # (logit soft-capping, a logit scale): its labels are generated instead
        totals, chosen = self._loss(labels)
        metrics, answers = loss_metrics(totals, task), None
        if labels is not None:
            answers = self._label_answers(labels, chosen, metrics)
        if generate and data.eval_prompts and not loss_only:
            answers = processes.unshard(generate_texts(
                self.model, self.tokenizer, processes.shard(data.eval_prompts), self.config.train.max_new_tokens,
                self.config.train.eval_batch_size, self.device, self.autocast, self.progress))
            found = generation_metrics(answers, data.eval_references, data.label_names)
            metrics.update({f"generation_{k}": v for k, v in found.items()} if labels else found)
        if not loss_only:  # causal LMs: perplexity on general text, to see what training costs outside the task
            metrics.update(general_text_metrics(self))
        self.model.train()
        release_free_memory()  # the evaluation batches' blocks, so training does not stack on them
        return Evaluation(metrics, self._samples(answers or []))

    def _loss(self, labels: list[list[int]] | None) -> tuple[LossTotals, list[int] | None]:
        """This split's loss totals over every rank and, when the labels can be read from the same forward (one
        token each, every example its prompt and answer: decided on the whole split, so every rank agrees),
        each example's highest-scoring label."""
        data, processes = self.data, self.processes
        one_pass = labels is not None and scores_ride_on_loss(data.eval_examples, data.eval_prompts, labels)
        part = loss_totals(self.forwards(), processes.shard(data.eval_examples),
                           self.unpacked_batches if one_pass else self.batches, task=self.config.model.task,
                           prompts=processes.shard(data.eval_prompts) if one_pass else None,
                           label_tokens=[label[0] for label in labels] if one_pass else None)
        totals = processes.total(part)
        return totals, totals.chosen if one_pass else None

    def _label_answers(self, labels: list[list[int]], chosen: list[int] | None, metrics: dict) -> list[str]:
        """Each prompt's label, by mean log-probability per token (the headline: label length does not bias
        it), with the summed choice beside it as `accuracy_summed` (lm-eval-harness's `acc`) when the labels
        differ in token count. `chosen` comes from the loss pass when every label is one token."""
        data, processes = self.data, self.processes
        summed = None
        if chosen is None:  # labels of several tokens: a pass of their own
            choices = scored_labels(self.forwards(), processes.shard(data.eval_prompts), labels,
                                    pad_id=self.tokenizer.pad_token_id)
            chosen = processes.unshard(choices["mean"])
            summed = processes.unshard(choices["summed"]) if length_sensitive(labels) else None
        answers = [data.label_names[k] for k in chosen]
        metrics.update(generation_metrics(answers, data.eval_references, data.label_names))
        if summed is not None:
            by_sum = [data.label_names[k] for k in summed]
            metrics["accuracy_summed"] = generation_metrics(by_sum, data.eval_references, data.label_names)["accuracy"]
        return answers

    def forwards(self) -> Forwards:
        return Forwards(self.model, self.device, self.config.train.eval_batch_size, self.autocast, self.progress,
                        self.loss_chunk)

    def _samples(self, answers: list[str]) -> list[dict[str, str]]:
        data = self.data
        return [{"prompt": self.tokenizer.decode(p, skip_special_tokens=True), "output": o, "reference": r}
                for p, o, r in zip(data.eval_prompts, answers, data.eval_references)][: self.config.train.num_samples]


def attention_for(requested: str, device: torch.device, precision: str, has_sdpa: bool = True) -> str:
    """`model.attn_implementation`, with `auto` resolved: eager on a CPU computing in bf16, else sdpa where the
    model has it (else eager). Measured on the demo (docs/benchmarks.md): eager trained faster on an AMX CPU in
    bf16; in fp32 on an AVX2 one, sdpa was as fast and kept no attention weights for backward."""
    if requested != "auto":
        return requested
    return "eager" if (device.type == "cpu" and precision == "bf16") or not has_sdpa else "sdpa"


def prepare(config: RunConfig, quiet: bool, adapter_dir: Path | None = None,
            processes: Processes | None = None) -> Session:
    """Load model and data, then add a fresh adapter (or load `adapter_dir`); the base stays frozen (other
    `config.method`s: see `methods.load_for_method`)."""
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
        dtype, checkpointing, note = _memory_plan(config, device, precision, processes)
        model, tokenizer = load_for_method(  # config.method: an adapter, every weight, or the head
            config, ADAPTER, label_names, dtype, saved=adapter_dir, quantize=spec.quantize,
            shard=_weight_shard(processes), compute_dtype=None if processes.sharded else compute_dtype(precision))
    except TargetError as exc:  # name the model the lora section does not fit
        raise TargetError(f"model {spec.name!r}: lora: {exc}") from None
    limit = max_positions(model)
    if limit is not None and data_config.max_length > limit and not model.config.is_encoder_decoder:
        raise ConfigError(f"data.max_length={data_config.max_length} exceeds the {limit} positions of {spec.name}")
    if spec.quantize == "int8" and device.type == "cpu":  # int8 x int8 products where the probe found them faster
        set_base_compute(model, cpu_choice(precision)["int8_base"])
    if spec.attn_implementation:
        has_sdpa = getattr(type(model), "_supports_sdpa", False)  # transformers' own flag
        model.set_attn_implementation(attention_for(spec.attn_implementation, device, precision, has_sdpa))
    save_less(model)  # the same values and gradients; the widest activations kept as their recipes
    if spec.task == "causal-lm" and decoder_body(model) is not None:
        compute_read_rows_only(decoder_body(model))  # the last MLP only where the loss reads
    data = load_datasets(data_config, tokenizer, spec.task)
    model.to(device)
    if checkpointing and not _set_gradient_checkpointing(model, config, checkpointing):
        checkpointing, note = False, f"off ({type(model).__name__} does not support it)"
    release_free_memory()  # what loading and tokenizing freed
    session = Session(config, model, tokenizer, data, device, precision, _progress_factory(quiet), config.loss_chunk,
                      processes, checkpointing, note)
    fallback = fallback_warning(session.batches, model.config, data_config.max_length)
    if fallback and processes.is_main:
        print(f"loratune: warning: {fallback}", file=sys.stderr)
    return session


def _weight_shard(processes: Processes) -> tuple[int, int] | None:
    """(rank, world) when FSDP2 shards the base over several processes: the loader then keeps only this rank's
    rows of a quantized base (one process loads it whole: it may run before it is wrapped, e.g. to pick a rate)."""
    return (processes.rank, processes.world) if processes.sharded and processes.world > 1 else None


def _set_gradient_checkpointing(model: torch.nn.Module, config: RunConfig, wanted: bool) -> bool:
    supported = getattr(model, "supports_gradient_checkpointing", False)
    if config.train.gradient_checkpointing and not supported:
        raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} does not support it")
    if wanted and supported:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return wanted and supported


def _memory_plan(config: RunConfig, device: torch.device, precision: str,
                 processes: Processes) -> tuple[torch.dtype, bool, str]:
    """(the frozen weights' dtype, gradient checkpointing on, why), decided before loading from the memory
    estimate on a CPU: a 16-bit checkpoint trained in fp32 stays in 16 bits only where fp32 weights would not
    fit (`memory.frozen_dtype`; not under FSDP2, which shards one dtype, nor on a GPU, whose memory the
    estimate does not model), then checkpointing; and a warning when even then the run is likely to exhaust
    the machine's memory. Every process decides alike."""
    explicit, plain = config.train.gradient_checkpointing, base_dtype(config.model.dtype, precision)
    if device.type != "cpu":  # the estimate models a CPU process; on a GPU a quantized base checkpoints
        on = explicit if explicit is not None else config.model.quantize != "none"
        why = "train.gradient_checkpointing" if explicit is not None else "GPU"
        return plain, on, f"{'on' if on else 'off'} ({why})"
    warning = None
    try:
        available = machine_memory()
        dtype = plain if processes.sharded else frozen_dtype(config, available)
        on, note = checkpointing_decision(config, available, dtype)
        warning = memory_warning(estimate_memory(config, on, dtype), available)
    except LoratuneError:
        raise
    except Exception as exc:  # an estimate that cannot be made must not stop a run that can
        dtype, on, note = plain, bool(explicit), f"{'on' if explicit else 'off'} (memory not estimated)"
        warning = f"peak memory could not be estimated ({type(exc).__name__}: {exc})"
    if warning and processes.is_main:
        print(f"loratune: warning: {warning}", file=sys.stderr)
    return dtype, on, note


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _progress_factory(quiet: bool):
    def make(iterable=None, **kwargs):
        return tqdm(iterable, disable=quiet, leave=False, dynamic_ncols=True, **kwargs)
    return make
