"""`loratune inspect`: what a model is made of, what a LoRA config would adapt, and what an adapter holds."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TextIO

from torch import nn

from loratune.core.adapters import add_adapter, delete_adapter, find_targets, trainable_parameters
from loratune.core.errors import ConfigError
from loratune.core.peft_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    first_non_finite,
    load_adapter,
    read_adapter_config,
    read_adapter_weights,
)


def module_summary(model: nn.Module) -> list[str]:
    """Leaf module types with counts and a few example paths."""
    by_type: dict[str, list[str]] = {}
    for path, module in model.named_modules():
        if path and not list(module.children()):
            by_type.setdefault(type(module).__name__, []).append(path)
    lines = []
    for kind, paths in sorted(by_type.items(), key=lambda kv: -len(kv[1])):
        names = Counter(p.split(".")[-1] for p in paths)
        shown = ", ".join(f"{n} x{c}" if c > 1 else n for n, c in names.most_common(6))
        lines.append(f"  {kind:<24} {len(paths):>5}  ({shown})")
    return lines


def adapter_summary(directory: str | Path) -> list[str]:
    config = read_adapter_config(directory)
    weights = read_adapter_weights(directory)
    size = sum((Path(directory) / name).stat().st_size for name in (CONFIG_NAME, WEIGHTS_NAME)
               if (Path(directory) / name).exists())
    return [f"adapter {directory}: r={config.r}, lora_alpha={config.lora_alpha}, dora={config.use_dora}, "
            f"rslora={config.use_rslora}, task_type={config.task_type}",
            f"  target_modules: {json.dumps(config.target_modules)}",
            f"  tensors: {len(weights)}, parameters: {sum(t.numel() for t in weights.values()):,}, "
            f"files: {size / 1024:.1f} KiB, base model: {config.base_model_name_or_path}",
            *([f"  warning: {bad!r} holds non-finite values (NaN or inf); loading it is refused"]
              if (bad := first_non_finite(weights)) else [])]


def adapter_fit(model: nn.Module, model_name: str, adapter: str) -> str:
    """Load the adapter onto `model` (then remove it): targets and shapes that do not fit raise the error naming
    them; an adapter that fits but names another base model gets a warning."""
    name = load_adapter(model, adapter, name="inspected")
    delete_adapter(model, name)
    base = read_adapter_config(adapter).base_model_name_or_path
    if base and _model_id(base) != _model_id(model_name):
        return f"warning: the adapter fits, but was made for base model {base!r}, not {model_name!r}"
    return "adapter fits this model"


def _model_id(name: str) -> str:
    """A comparable id: a path's resolved final name or a hub name's last part, lower case."""
    path = Path(name).expanduser()
    return (path.resolve().name if path.exists() else name.rstrip("/").rsplit("/", 1)[-1]).lower()


def inspect_command(model_name: str | None, task: str | None, config_path: str | None, adapter: str | None,
                    out: TextIO, memory: bool = False) -> None:
    if memory:
        if not config_path:
            raise ConfigError("inspect --memory: give --config, the run to estimate")
        from loratune.train import load_config
        from loratune.train.memory import estimate_memory, machine_memory

        out.write("\n".join(estimate_memory(load_config(config_path)).lines(machine_memory())) + "\n")
        return
    if not (model_name or config_path or adapter):
        raise ConfigError("inspect: give --model, --config or --adapter")
    lines = adapter_summary(adapter) if adapter else []
    run = None
    if config_path:
        from loratune.train import load_config

        run = load_config(config_path)
        model_name, task = model_name or run.model.name, run.model.task
    if not model_name:
        out.write("".join(line + "\n" for line in lines))
        return
    from loratune.pretrained import adapter_task, load_model

    labels = None
    if adapter and run is None:
        task, labels = adapter_task(adapter, model_name, task)
    model, _ = load_model(model_name, task or "causal-lm", num_labels=labels)
    if adapter:
        lines.append(adapter_fit(model, model_name, adapter))  # a mismatch is the one error, before any output
    out.write("".join(line + "\n" for line in lines))
    count = trainable_parameters(model)
    out.write(f"model {model_name}: {count.total:,} parameters\n" + "\n".join(module_summary(model)) + "\n")
    if run is not None and run.lora is not None:  # method full or head: no adapter to place
        targets = find_targets(model, run.lora)
        names = Counter(p.split(".")[-1] for p in targets)
        out.write(f"lora targets: {len(targets)} modules ({', '.join(f'{n} x{c}' for n, c in names.items())})\n")
        add_adapter(model, run.lora)
        out.write(f"{trainable_parameters(model)}\n")
