"""Checkpoints: a folder per step holding the adapter, optimizer, scheduler, RNG state and data position.

A checkpoint is written under a temporary name and renamed when complete, so a crash never leaves a
folder that looks finished; resuming picks the newest complete one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loratune.core.atomic_write import atomic_folder
from loratune.core.errors import LoratuneError
from loratune.core.peft_format import load_adapter_weights_into, save_adapter

STATE_NAME = "trainer_state.pt"
META_NAME = "checkpoint.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, model: nn.Module, adapter: str, trainer_state: dict[str, Any],
                    keep: int) -> Path:
    """Write checkpoint `step-N` atomically, then drop the oldest beyond `keep`."""
    final = root / f"step-{step}"
    with atomic_folder(final, replace=True) as tmp:
        save_adapter(model, tmp, adapter)
        torch.save(trainer_state, tmp / STATE_NAME)
        (tmp / META_NAME).write_text(json.dumps({"step": step}) + "\n", encoding="utf-8")
    for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first (temporary folders start with '.' and are ignored)."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / META_NAME).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: Path, model: nn.Module, adapter: str) -> dict[str, Any]:
    """Put the checkpoint's adapter weights into `model` and return the trainer state."""
    try:
        load_adapter_weights_into(model, path, adapter)
        return torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise LoratuneError(f"{path}: cannot read checkpoint ({exc})") from None
