"""The run configuration: one YAML file, validated in full before any model loads.

Every key can be overridden from the command line with `--set section.key=value` (the value is read as
YAML, so `--set train.max_steps=50` gives an int). Errors name the key and the file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loratune.core.errors import ConfigError
from loratune.core.lora_config import LoraConfig
from loratune.data import DataConfig
from loratune.tasks import Task

DEFAULT_LOSS_CHUNK = 1024  # labelled tokens per chunk of the output head and loss
RENAMED_KEYS = {"data.packing": "data.concatenate_texts"}  # an old key's error names the new one


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class ModelSpec(_Strict):
    name: str = Field(description="built-in name, local model folder, .gguf file, or hub id")
    task: Task = "causal-lm"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the frozen base weights (auto: bfloat16 when training in bf16; in fp32, "
                            "float32, or a local 16-bit checkpoint's own dtype where the run's estimated peak with "
                            "float32 weights exceeds the machine's memory). A 16-bit base trained in fp32 keeps its "
                            "Linear weights in 16 bits and widens each for its product; adapters stay float32")
    attn_implementation: Literal["auto", "eager", "sdpa"] | None = Field(
        None, description="attention kernel (default: transformers' choice); auto: eager where a CPU computes in "
                          "bf16 (faster there for rows of a few hundred tokens), else sdpa (as fast in fp32, leaner)")
    trust_remote_code: bool = False
    quantize: Literal["none", "nf4", "int8"] = Field(
        "none", description="store the frozen linear layers in NF4 or int8 (QLoRA); output heads and adapters "
                            "stay in full precision")
    double_quant: bool = Field(True, description="nf4: store the block scales in int8 too (about 0.37 bits "
                                                 "per weight less)")
    loftq_iterations: int = Field(
        0, ge=0, le=20, description="with quantize: LoftQ initialisation, so base + adapter starts closer to the "
                                    "full-precision weights (loads the model in full precision first)")

    @model_validator(mode="after")
    def _loftq_needs_quantize(self) -> ModelSpec:
        if self.loftq_iterations and self.quantize == "none":
            raise ValueError("loftq_iterations needs model.quantize (nf4 or int8)")
        return self


class TrainSpec(_Strict):
    max_steps: int = Field(100, gt=0, description="optimizer steps")
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    learning_rate: float | Literal["auto"] = Field(
        2e-4, description="a rate, or auto: chosen on the training split by train.lr_search (train/auto_lr.py)")
    lr_search: Literal["halving", "range"] = Field(
        "halving", description="how learning_rate: auto chooses: successive halving on a part carved from the "
                               "training split, or a range test (a fifth of the run's steps; docs/quality.md)")
    lora_plus_ratio: float = Field(1.0, ge=1.0, description="LoRA+: learning-rate multiplier for B factors")
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast where supported")
    gradient_checkpointing: bool | None = Field(
        None, description="recompute activations in backward to save memory (default: on only when the memory "
                          "estimate without it exceeds the machine's memory)")
    loss_chunk_tokens: int | None = Field(
        None, ge=0, description="causal LM: run the output head and loss this many labelled tokens at a time, "
                                "never holding all logits (0: off, full logits; default 1024)")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: only before and after)")
    eval_batch_size: int = Field(16, gt=0)
    early_stopping_patience: int | None = Field(None, gt=0, description="evaluations without improvement")
    checkpoint_every: int = Field(0, ge=0)
    keep_checkpoints: int = Field(2, gt=0)
    seed: int = 0
    max_new_tokens: int = Field(32, gt=0, description="tokens generated per answer in evaluation")
    num_samples: int = Field(3, ge=0, description="sample generations shown before and after")
    generation_eval: bool = Field(
        False, description="generate answers after each prompt and score them (accuracy, or BLEU and chrF) "
                           "before and after training; beside label scores, as generation_accuracy and "
                           "generation_macro_f1 (a causal LM whose answers are a known label set is scored by each "
                           "label's log-likelihood after the prompt, without generating)")
    general_text: str | None = Field(
        "builtin", description="causal LMs: perplexity on this general text (a file, or builtin: a short sample "
                               "of everyday prose shipped with loratune) before and after training, to measure "
                               "forgetting; null: off")
    batching: Literal["padded", "packed", "shared_prefix"] = Field(
        "padded", description="causal LMs: padded rows; packed (padding-free rows, attention kept within each "
                              "sequence); or shared_prefix (a batch's common first tokens computed once)")
    prefix_grouped: bool = Field(False, description="batches of examples that start alike (data with several "
                                                    "prompt templates, for shared_prefix), order kept random "
                                                    "across groups of 50 batches")
    @field_validator("learning_rate", mode="plain")
    @classmethod
    def _rate_or_auto(cls, value: Any) -> float | str:
        """A positive finite number or `auto` (checked by hand: a union's errors would name its members)."""
        if value == "auto":
            return value
        try:
            if isinstance(value, bool):  # `true` is not a rate
                raise TypeError
            rate = float(value)
        except (TypeError, ValueError):
            raise ValueError("Input should be a number or auto") from None
        if not math.isfinite(rate):
            raise ValueError("Input should be a finite number")
        if rate <= 0:
            raise ValueError("Input should be greater than 0")
        return rate

    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: ddp (every rank holds the base; only adapter gradients are "
                           "all-reduced) or fsdp (transformer blocks sharded with FSDP2, for bases too big for one "
                           "process)")
    distributed_timeout: float = Field(
        300, gt=0, description="under torchrun: seconds a rank waits for the others before the job ends with an "
                               "error naming the rank")


class RunConfig(_Strict):
    method: Literal["lora", "full", "head"] = Field(
        "lora", description="lora: an adapter on the frozen base; full: every weight trains (the baseline); "
                            "head: only a classifier's head trains (a linear probe); see train/methods.py")
    model: ModelSpec
    lora: LoraConfig | None = Field(None, description="the adapter (required by method: lora)")
    data: DataConfig
    train: TrainSpec = TrainSpec()
    output_dir: Path = Path("runs/latest")

    @field_validator("lora", mode="before")
    @classmethod
    def _lora_as_written(cls, value: Any) -> Any:
        """Build `LoraConfig` from the YAML values themselves: its own checks are strict (`r: true` is not 1),
        where validating the dataclass's fields would coerce first."""
        return LoraConfig.from_dict(value, "LoraConfig") if isinstance(value, dict) else value

    @property
    def loss_chunk(self) -> int:
        """`train.loss_chunk_tokens`, 1024 by default (0: no chunking, full logits)."""
        explicit = self.train.loss_chunk_tokens
        return explicit if explicit is not None else DEFAULT_LOSS_CHUNK

    @model_validator(mode="after")
    def _batching_needs_a_causal_lm(self) -> RunConfig:
        if self.train.batching != "padded" and self.model.task != "causal-lm":
            raise ValueError(f"train.batching: {self.train.batching} needs model.task: causal-lm")
        return self

    @model_validator(mode="after")
    def _generation_needs_a_generator(self) -> RunConfig:
        if self.train.generation_eval and self.model.task == "classification":
            raise ValueError("train.generation_eval: a classification model does not generate; its accuracy "
                             "comes from its head")
        return self

    @model_validator(mode="after")
    def _method_limits(self) -> RunConfig:
        """What full fine-tuning and the probe cannot combine with, said before any weight loads."""
        spec, tc, method = self.model, self.train, self.method
        if method == "lora":
            if self.lora is None:
                raise ValueError("lora: required (the adapter's settings) unless method is full or head")
            return self
        if spec.quantize != "none" or spec.loftq_iterations:
            raise ValueError(f"method: {method} trains dense weights; leave model.quantize and "
                             "model.loftq_iterations unset")
        if spec.dtype not in ("auto", "float32"):
            raise ValueError(f"method: {method} keeps float32 weights; leave model.dtype unset")
        if method == "head" and spec.task != "classification":
            raise ValueError("method: head (a linear probe) needs model.task: classification")
        if tc.lora_plus_ratio != 1.0:
            raise ValueError(f"train.lora_plus_ratio: LoRA+ needs method: lora, not {method}")
        return self

    @model_validator(mode="after")
    def _one_initialisation(self) -> RunConfig:
        if self.model.loftq_iterations and self.lora and self.lora.init_lora_weights == "pissa":
            raise ValueError("model.loftq_iterations and lora.init_lora_weights: pissa both set the adapter's "
                             "start; choose one")
        return self


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.max_steps=50")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = child
    try:
        node[leaf] = yaml.safe_load(raw)
    except yaml.YAMLError:
        node[leaf] = raw


def format_validation_error(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        message = f"renamed to {RENAMED_KEYS[key]}" if key in RENAMED_KEYS else "unknown key"
    more = f" (and {len(error.errors()) - 1} more)" if len(error.errors()) > 1 else ""
    # a check of the whole config names its keys in its message
    return f"{source}: {key}: {message}{more}" if key else f"{source}: {message}{more}"


def validate_config(data: dict[str, Any], source: str) -> RunConfig:
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    _check_data_files(config, source)
    return config


def _check_data_files(config: RunConfig, source: str) -> None:
    """A missing data file is reported now, not after minutes of model loading (a format the columns do
    not decide is found by `data.check_sources`, which reads the records, also before loading)."""
    from loratune.data import builtin_datasets

    general = config.train.general_text
    if general not in (None, "builtin") and not Path(general).expanduser().is_file():
        raise ConfigError(f"{source}: train.general_text: no such file: {general!r} (or builtin, or null)")
    for key in ("train", "validation"):
        value = getattr(config.data, key)
        if value is not None and value not in builtin_datasets() and not Path(value).expanduser().is_file():
            raise ConfigError(f"{source}: data.{key}: no such file or built-in dataset: {value!r}")


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        if exc.object[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise ConfigError(f"{path}: the file is UTF-16 text; save the config as UTF-8") from None
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at position {exc.start}); "
                          "save the config as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]  # a ReaderError has no `problem`
        raise ConfigError(f"{path}:{where} invalid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, lora, data, train)")
    for assignment in overrides or []:
        apply_override(data, assignment)
    return validate_config(data, str(path))


def config_to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
