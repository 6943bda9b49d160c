"""Checkpoints: a folder per step holding the adapter, optimizer, scheduler, RNG state and data position.

A checkpoint is written under a temporary name and renamed when complete, so a crash never leaves a
folder that looks finished; resuming picks the newest complete one that can be read. Under FSDP2 every rank
writes its shard of the optimizer state into the same temporary folder (`torch.distributed.checkpoint`), and
rank 0 renames it once all have: the folder must then be one that every rank can reach. Such a checkpoint
resumes on any number of processes, one included (the shards are re-cut on loading).
"""

from __future__ import annotations

import io
import json
import pickle
import random
import re
import shutil
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loratune.core.atomic_write import atomic_folder
from loratune.core.errors import LoratuneError, WriteError
from loratune.train.methods import load_trainable, save_trainable
from loratune.train.processes import Processes

STATE_NAME = "trainer_state.pt"
META_NAME = "checkpoint.json"
OPTIMIZER_SHARDS = "optimizer"  # an FSDP run's optimizer state, one file per rank
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
                    keep: int, processes: Processes | None = None, sharded_optimizer: Any = None) -> Path:
    """Write checkpoint `step-N` atomically, then drop the oldest beyond `keep`. Every rank calls this; rank 0
    writes the files, and every rank its shard of `sharded_optimizer` when given (else the optimizer state is
    in `trainer_state`)."""
    processes, final = processes or Processes(), root / f"step-{step}"
    with ExitStack() as folder:
        tmp = processes.on_main(lambda: folder.enter_context(atomic_folder(final, replace=True)))
        if sharded_optimizer is not None:
            save_optimizer_shards(tmp / OPTIMIZER_SHARDS, model, sharded_optimizer)
        with processes.full_parameters(model):
            processes.on_main(lambda: _write_files(tmp, step, model, adapter, trainer_state))
        processes.on_main(folder.close)  # every rank's part is written: rank 0 renames the folder into place
    processes.on_main(lambda: [shutil.rmtree(old) for old in complete_checkpoints(root)[:-keep] if keep > 0])
    return final


def _write_files(folder: Path, step: int, model: nn.Module, adapter: str, trainer_state: dict[str, Any]) -> None:
    save_trainable(model, folder, adapter)  # the adapter, or every trainable weight (methods other than lora)
    # serialized in memory, then written by Python: a full disk is then an OSError with its cause,
    # where torch.save writing the file itself reports only a position mismatch
    buffer = io.BytesIO()
    torch.save(trainer_state, buffer)
    (folder / STATE_NAME).write_bytes(buffer.getvalue())
    (folder / META_NAME).write_text(json.dumps({"step": step}) + "\n", encoding="utf-8")


def save_optimizer_shards(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shard of the optimizer state (keyed by parameter name, so any number of ranks can
    read it back)."""
    from torch.distributed.checkpoint import CheckpointException, save
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    try:
        save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=folder,
             no_dist=not torch.distributed.is_initialized())
    except CheckpointException as exc:  # a BaseException: made the one-line error every write failure is
        raise WriteError(f"{folder}: the optimizer state could not be written ({_first_line(exc)})") from None


def load_optimizer_shards(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank reads its part of the state `save_optimizer_shards` wrote, whatever the number of ranks
    that wrote it and that reads it now (one process included)."""
    from torch.distributed.checkpoint import CheckpointException, load
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    _create_state(optimizer)  # the state to read into must exist: its shapes and shards say what to read
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    try:
        load(state, checkpoint_id=folder, no_dist=not torch.distributed.is_initialized())
    except CheckpointException as exc:
        raise CheckpointUnreadable(f"checkpoint {folder.parent} is unreadable ({OPTIMIZER_SHARDS}: "
                                   f"{_first_line(exc)})") from None
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


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


class CheckpointUnreadable(LoratuneError):
    """A checkpoint's files are missing, truncated, corrupt or hold objects that are not plain data."""


def load_checkpoint(path: Path, model: nn.Module, adapter: str) -> dict[str, Any]:
    """Put the checkpoint's adapter weights into `model` and return the trainer state.

    The state is read first (with `weights_only`: a tampered pickle is refused, nothing in it runs), so a
    checkpoint that cannot be read leaves the model as it was.
    """
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle protocol before refusing it
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's weights-only unpickler met more than tensors and plain values
        raise CheckpointUnreadable(f"checkpoint {path} is unreadable ({STATE_NAME}: holds objects other than tensors "
                                   "and plain values, refused unread, since unpickling them could run code)") from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointUnreadable(f"checkpoint {path} is unreadable ({STATE_NAME}: {_first_line(exc)})") from None
    if not isinstance(state, dict) or not {"scheduler", "state", "rng"} <= set(state) or not (
            "optimizer" in state or (path / OPTIMIZER_SHARDS).is_dir()):
        raise CheckpointUnreadable(f"checkpoint {path} is unreadable ({STATE_NAME}: not a loratune trainer state)")
    try:
        load_trainable(model, path, adapter)
    except LoratuneError as exc:
        raise CheckpointUnreadable(f"checkpoint {path} is unreadable ({_first_line(exc)})") from None
    return state


def load_newest_readable(root: Path, model: nn.Module, adapter: str) -> tuple[Path, dict[str, Any], list[str]]:
    """The newest checkpoint that can be read: `(path, trainer state, warnings)`, one warning per newer
    checkpoint passed over. Raises the newest's `CheckpointUnreadable` when none can be read."""
    found = complete_checkpoints(root)
    if not found:
        raise LoratuneError(f"{root}: no complete checkpoint to resume from")
    warnings, first_error = [], None
    for path in reversed(found):
        try:
            return path, load_checkpoint(path, model, adapter), warnings
        except CheckpointUnreadable as exc:
            first_error = first_error or exc
            warnings.append(f"{exc}; trying the one before")
    raise first_error


def _create_state(optimizer: torch.optim.Optimizer) -> None:
    """Give a fresh optimizer its per-parameter state (zeros) by one step of learning rate 0 on zero gradients;
    the parameters do not move."""
    if optimizer.state:
        return
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
