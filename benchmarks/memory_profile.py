"""Where the demo's peak memory goes: in one fresh process, the resident memory after each piece of the demo's
job and the peak while it ran (the kernel's high-water mark, reset before each piece), with the pieces nested
as they call each other (load: tokenizer, weights, adapter; evaluation: loss, label scoring; a training step:
forward, backward, optimizer).

    python -m benchmarks memory [--steps 20] [--empty-cache] [--set KEY=VALUE ...]

`--empty-cache` points `LORATUNE_CACHE` at an empty folder, so the built-in GGUF model is converted first (a
first run's cost). The first training step also counts the bytes autograd saves for backward (unique
storages, through `saved_tensors_hooks`): the activations of one batch.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_mb(key: str) -> float:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class Phases:
    """Rows of (depth, phase, RSS after, peak during, seconds); phases nest, each peak is its own."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, str, float, float, float]] = []
        self._open: list[list[float]] = []  # per open phase: [peak folded in so far]
        self.started = time.perf_counter()

    def _reset_peak(self) -> None:
        """Fold the high-water mark into every open phase, then start a new one (Linux: clear_refs 5)."""
        now = _status_mb("VmHWM")
        for frame in self._open:
            frame[0] = max(frame[0], now)
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:  # not Linux, or not allowed: peaks become "so far" peaks
            pass

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._reset_peak()
        frame = [0.0]
        self._open.append(frame)
        index = len(self.rows)
        self.rows.append((len(self._open) - 1, name, 0.0, 0.0, 0.0))
        begun = time.perf_counter()
        try:
            yield
        finally:
            peak = max(frame[0], _status_mb("VmHWM"))
            self._open.pop()
            for outer in self._open:
                outer[0] = max(outer[0], peak)
            self.rows[index] = (len(self._open), name, _status_mb("VmRSS"), peak, time.perf_counter() - begun)

    def wrap(self, owner: Any, attribute: str, name: str) -> None:
        """Make every call of `owner.attribute` a phase called `name`."""
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(owner, attribute, wrapped)

    def table(self) -> str:
        lines = ["| phase | RSS after, MB | peak during, MB | seconds |", "|---|---|---|---|"]
        for depth, name, now, peak, seconds in self.rows:
            lines.append(f"| {'&nbsp;&nbsp;' * depth}{name} | {now:.0f} | {peak:.0f} | {seconds:.1f} |")
        peak = max(row[3] for row in self.rows)  # ru_maxrss is reset with the high-water mark: not used
        lines.append(f"\nWhole process: peak RSS {peak:.0f} MB (the largest phase peak), "
                     f"{time.perf_counter() - self.started:.0f} s.")
        return "\n".join(lines)


@contextlib.contextmanager
def saved_bytes(into: dict[str, int]) -> Iterator[None]:
    """Count the bytes of the tensors autograd saves for backward (each storage once) into `into`."""
    import torch

    seen: set[int] = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen and not isinstance(tensor, torch.nn.Parameter):
            seen.add(storage.data_ptr())
            into["bytes"] = into.get("bytes", 0) + storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield


def _instrument(phases: Phases) -> None:
    """Phases for the pieces `prepare`, evaluation and a training step call."""
    import loratune.pretrained as pretrained
    import loratune.train.loop as loop

    phases.wrap(pretrained, "gguf_to_folder", "GGUF conversion into the cache")
    phases.wrap(pretrained, "_load_tokenizer", "tokenizer")
    phases.wrap(pretrained, "_load_weights", "weights")
    phases.wrap(pretrained, "add_adapter", "adapter added")
    phases.wrap(loop, "load_datasets", "data: read, split, tokenized")
    phases.wrap(loop, "loss_totals", "loss evaluation")
    phases.wrap(loop, "scored_labels", "label scoring")


def _first_step(phases: Phases, run: Any, order: Any, progress: Any) -> None:
    """The first training step, with its forward, backward and optimizer step as phases, and the bytes
    autograd saves for backward counted."""
    import torch

    from loratune.train.loop import train_step

    saved: dict[str, int] = {}
    trainer, backward, step = run.trainer, torch.Tensor.backward, run.optimizer.step

    def forward(*args: Any, **kwargs: Any) -> Any:
        with saved_bytes(saved):
            return trainer(*args, **kwargs)

    run.trainer = forward
    phases.wrap(run, "trainer", "forward")
    phases.wrap(torch.Tensor, "backward", "backward")
    phases.wrap(run.optimizer, "step", "optimizer step (its state made)")
    try:
        train_step(run, order, progress)
    finally:
        run.trainer, torch.Tensor.backward, run.optimizer.step = trainer, backward, step
    state = run.optimizer.state.values()
    optimizer_mb = sum(t.numel() * t.element_size() for s in state for t in s.values() if torch.is_tensor(t)) / 2**20
    rows = run.session.config.train.batch_size
    phases.rows.append((1, f"(saved for backward: {saved.get('bytes', 0) / 2**20:.0f} MB at batch {rows}; "
                           f"optimizer state {optimizer_mb:.1f} MB)", 0.0, 0.0, 0.0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks memory")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--empty-cache", action="store_true", help="convert the GGUF model into an empty cache first")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    phases = Phases()
    with tempfile.TemporaryDirectory() as tmp:
        if args.empty_cache:
            os.environ["LORATUNE_CACHE"] = str(Path(tmp) / "cache")
        with phases.phase("imports: torch, transformers, loratune"):
            import torch  # noqa: F401
            import transformers  # noqa: F401

            from loratune.batching import BatchOrder
            from loratune.train import demo_config
            from loratune.train.loop import finish, start_run, train_step
            from loratune.train.session import prepare
        _instrument(phases)
        _run(phases, demo_config(Path(tmp) / "run", [f"train.max_steps={args.steps}", *args.set]), Path(tmp),
             args.steps, (prepare, start_run, train_step, finish, BatchOrder))
    print(phases.table())
    return 0


def _run(phases: Phases, config: Any, tmp: Path, steps: int, recipe: tuple[Callable, ...]) -> None:
    prepare, start_run, train_step, finish, batch_order = recipe
    with phases.phase("prepare: model load + adapter + data"):
        session = prepare(config, quiet=True)
    with phases.phase("evaluation before training"):
        run = start_run(session, tmp / "run")
    session.model.train()
    order = batch_order(len(session.data.train_examples), config.train.batch_size, config.train.seed)
    progress = session.progress(total=steps)
    with phases.phase("first training step"):
        _first_step(phases, run, order, progress)
    with phases.phase(f"{steps - 1} more training steps"):
        for _ in range(steps - 1):
            train_step(run, order, progress)
    with phases.phase("evaluation after training + save"):
        finish(run)


if __name__ == "__main__":
    sys.exit(main())
