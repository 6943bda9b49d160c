"""The two libraries under test, behind the same small interface.

`loratune_train_setup` and `peft_train_setup` each build the adapted model, its optimizer and a step
function from one `BenchConfig`; they are the only places that decide how a library trains, so a faster
loratune training path plugs in by changing `loratune_train_setup` alone. The `*Ops` classes cover the
inference-side operations (disable, merge, save/load, extra adapters, mixed-adapter batches).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

LR = 1e-4


@dataclass(frozen=True)
class BenchConfig:
    """Everything a configuration needs to build and train an adapter, identical for both libraries."""

    r: int
    targets: list[str] | str
    lora_dropout: float
    precision: str  # "fp32" or "bf16" (torch.autocast with bfloat16); see `resolve_precision` for "auto"
    device: str = "cpu"
    init_lora_weights: bool = True

    @property
    def lora_alpha(self) -> int:
        return 2 * self.r


@dataclass
class Setup:
    """An adapted model ready to train: `step(input_ids)` runs one optimizer step and returns the loss."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[torch.Tensor], float]


def precision_context(cfg: BenchConfig) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on `cfg.device`, or nothing for fp32."""
    if cfg.precision == "bf16":
        return torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16)
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"unknown precision {cfg.precision!r}")


def resolve_precision(precision: str, device: str) -> str:
    """A configuration's precision on this machine: "auto" is what `loratune train` resolves it to (bf16
    where the hardware has native bf16 matmuls, fp32 elsewhere); "fp32" and "bf16" stay as they are."""
    if precision != "auto":
        return precision
    from loratune.precision import resolve_precision as loratune_precision

    return loratune_precision("auto", torch.device(device))


def native_bf16(device: str) -> bool:
    """Whether bf16 matmuls have hardware support here; without it bf16 autocast is far slower than fp32."""
    return resolve_precision("auto", device) == "bf16"


def trainable_count(model: nn.Module) -> int:
    """Parameters that receive gradients, counted the same way for both libraries."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


def causal_lm_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                   cfg: BenchConfig) -> Callable[[torch.Tensor], float]:
    """The plain training step both libraries use today: forward under `precision_context`, backward, AdamW."""

    def step(input_ids: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        with precision_context(cfg):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        return float(loss.item())

    return step


# --- loratune --------------------------------------------------------------------------------------------------
def loratune_train_setup(model: nn.Module, cfg: BenchConfig) -> Setup:
    """loratune's default training path, as `loratune train` runs it (`precision: auto`): where bf16 is
    native the frozen base is stored in bf16 (`model.dtype: auto`) while the adapter stays fp32; the loss is
    the trainer's."""
    import loratune
    from loratune.precision import base_dtype
    from loratune.train.run_config import DEFAULT_LOSS_CHUNK
    from loratune.train.step import causal_lm_loss

    model.to(base_dtype("auto", cfg.precision))
    config = loratune.LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=cfg.targets, init_lora_weights=cfg.init_lora_weights)
    loratune.add_adapter(model, config, "default")
    model.to(cfg.device)
    optimizer = _optimizer(model)

    def step(input_ids: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
        with precision_context(cfg):
            loss, _, _ = causal_lm_loss(model, batch, DEFAULT_LOSS_CHUNK)
        loss.backward()
        optimizer.step()
        return float(loss.item())

    return Setup(model, optimizer, step)


class LoratuneOps:
    """Inference-side operations through loratune's public API."""

    def __init__(self, cfg: BenchConfig) -> None:
        import loratune

        self.lt = loratune
        self.cfg = cfg

    def disabled(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        return self.lt.disable_adapters(model)

    def merge(self, model: nn.Module) -> None:
        self.lt.merge(model)

    def unmerge(self, model: nn.Module) -> None:
        self.lt.unmerge(model)

    def save(self, model: nn.Module, directory: Path) -> None:
        self.lt.save_adapter(model, directory, "default")

    def load(self, model: nn.Module, directory: Path, name: str) -> None:
        self.lt.load_adapter(model, directory, name=name)

    def delete(self, model: nn.Module, name: str) -> None:
        self.lt.delete_adapter(model, name)

    def add(self, model: nn.Module, name: str) -> None:
        cfg = self.cfg
        config = self.lt.LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                    target_modules=cfg.targets, init_lora_weights=cfg.init_lora_weights)
        self.lt.add_adapter(model, config, name)
        model.to(cfg.device)

    def forward_single(self, model: nn.Module, name: str, input_ids: torch.Tensor) -> torch.Tensor:
        self.lt.set_active_adapters(model, [name])
        return model(input_ids=input_ids).logits

    def forward_mixed(self, model: nn.Module, names: Sequence[str], input_ids: torch.Tensor) -> torch.Tensor:
        with self.lt.mixed_adapter_batch(model, list(names)):
            return model(input_ids=input_ids).logits


# --- PEFT ------------------------------------------------------------------------------------------------------
def _peft_config(model: nn.Module, cfg: BenchConfig) -> Any:
    import peft

    fan_in_fan_out = getattr(model.config, "model_type", "") == "gpt2"  # transformers' Conv1D layers
    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                           target_modules=cfg.targets, init_lora_weights=cfg.init_lora_weights,
                           fan_in_fan_out=fan_in_fan_out, task_type="CAUSAL_LM")


def peft_train_setup(model: nn.Module, cfg: BenchConfig) -> Setup:
    """PEFT's usual training set-up: get_peft_model, AdamW, the shared step at `cfg.precision`."""
    import peft

    peft_model = peft.get_peft_model(model, _peft_config(model, cfg))
    peft_model.to(cfg.device)
    optimizer = _optimizer(peft_model)
    return Setup(peft_model, optimizer, causal_lm_step(peft_model, optimizer, cfg))


class PeftOps:
    """Inference-side operations through PEFT's PeftModel methods."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg

    def disabled(self, model: Any) -> contextlib.AbstractContextManager[Any]:
        return model.disable_adapter()

    def merge(self, model: Any) -> None:
        model.merge_adapter()

    def unmerge(self, model: Any) -> None:
        model.unmerge_adapter()

    def save(self, model: Any, directory: Path) -> None:
        model.save_pretrained(str(directory), selected_adapters=["default"])

    def load(self, model: Any, directory: Path, name: str) -> None:
        model.load_adapter(str(directory), adapter_name=name)

    def delete(self, model: Any, name: str) -> None:
        model.delete_adapter(name)

    def add(self, model: Any, name: str) -> None:
        model.add_adapter(name, _peft_config(model.get_base_model(), self.cfg))
        model.to(self.cfg.device)

    def forward_single(self, model: Any, name: str, input_ids: torch.Tensor) -> torch.Tensor:
        model.set_adapter(name)
        return model(input_ids=input_ids).logits

    def forward_mixed(self, model: Any, names: Sequence[str], input_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, adapter_names=list(names)).logits


class Ops(Protocol):
    def disabled(self, model: Any) -> contextlib.AbstractContextManager[Any]: ...
    def merge(self, model: Any) -> None: ...
    def unmerge(self, model: Any) -> None: ...
    def save(self, model: Any, directory: Path) -> None: ...
    def load(self, model: Any, directory: Path, name: str) -> None: ...
    def delete(self, model: Any, name: str) -> None: ...
    def add(self, model: Any, name: str) -> None: ...
    def forward_single(self, model: Any, name: str, input_ids: torch.Tensor) -> torch.Tensor: ...
    def forward_mixed(self, model: Any, names: Sequence[str], input_ids: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Library:
    """A configuration under test: a library's set-up function, its ops, and the precision it trains at."""

    label: str
    setup: Callable[[nn.Module, BenchConfig], Setup]
    ops: Callable[[BenchConfig], Ops]
    precision: str


#: The configurations compared, in the order they alternate. `loratune` is loratune's default setting
#: (`precision: auto`); PEFT runs plain fp32 and with bf16 autocast (its fastest setting where bf16 is native;
#: `unavailable_config` skips it elsewhere). Ratios are loratune / each PEFT one.
CONFIGS: dict[str, Library] = {
    "loratune": Library("loratune", loratune_train_setup, LoratuneOps, "auto"),
    "peft-fp32": Library("peft-fp32", peft_train_setup, PeftOps, "fp32"),
    "peft-bf16": Library("peft-bf16", peft_train_setup, PeftOps, "bf16"),
}
CONFIG_ORDER: tuple[str, ...] = tuple(CONFIGS)
BASELINES: tuple[str, ...] = ("peft-bf16", "peft-fp32")


def unavailable_config(label: str, device: str) -> str | None:
    """Why a configuration is not run here, else None: bf16 autocast on a CPU without native bf16 would
    measure an emulation many times slower than fp32, which is nobody's best setting."""
    if CONFIGS[label].precision == "bf16" and not native_bf16(device):
        return "not run: this CPU has no native bf16 (AMX or AVX512-BF16), so fp32 is PEFT's fastest setting"
    return None
