"""`train.learning_rate: auto`: the rate chosen on the training split alone; the held-out split is never read,
so the run's reported metrics stay honest. Two searches (`train.lr_search`):

- `halving` (the default): successive halving on a validation part carved from the training split. It ranks
  rates by the quantity that matters (validation loss after real, if short, training with the run's own
  steps, batch order and schedule). Candidates span the method's usual range; each round trains every
  survivor from the same start for twice the previous round's steps and keeps the better half, until one is
  left. Short rounds favour high rates: the best peak rate falls as a run lengthens, and the last round is a
  fifth of the run. Taken as it was, the last round's winner collapsed a full run to chance on one seed of
  three (docs/quality.md). So the winner is scaled to the run's length, by the square root of (last round's
  steps / run's steps), and the nearest candidate to that is the choice: one candidate lower at the default
  lengths. It costs about 1.2x the run's steps.
- `range`: a range test (Leslie Smith's, as fastai runs it): one run of a fifth of the run's steps whose rate
  grows geometrically from a tenth of the lowest candidate to ten times the highest, stopped once the smoothed
  training loss passes four times its best; the choice is the candidate nearest a tenth of the rate at the
  smoothed loss's minimum. It costs a fifth of the run's steps and reads no validation part.

Either way the model's start and the random streams are restored afterwards, so the run that follows is the
one a fixed `learning_rate` equal to the choice would give. docs/quality.md compares the two.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from loratune.core.atomic_write import write_text_atomic
from loratune.core.errors import ConfigError
from loratune.data import DataSplit
from loratune.train.evaluate import loss_metrics, loss_totals
from loratune.train.optim import build_optimizer, build_scheduler
from loratune.train.run_step import Run, RunState, TrainingDiverged, batch_order, optimizer_step, trainer_for

CHOICE_NAME = "learning_rate_choice.json"
CANDIDATES = {"lora": (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3),
              "full": (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4),
              "head": (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)}
SEARCHES = {"halving": "successive halving", "range": "a range test"}  # train.lr_search -> the choice's "how"
VALIDATION_FRACTION = 0.1
MAX_VALIDATION = 500


def resolve_learning_rate(session: Any, out: Path, stopping: Callable[[], bool] = lambda: False) -> bool:
    """Replace `auto` in `session.config` by a rate: the one this folder's run chose before (a resumed or
    restarted run), else a new choice, written to `out/learning_rate_choice.json` for the report. Returns
    False when a stop signal came during the search (nothing is written then)."""
    tc = session.config.train
    if tc.learning_rate != "auto":
        return True
    if session.processes.world > 1:
        raise ConfigError("train.learning_rate: auto chooses in one process; choose with `loratune train` first, "
                          "then set the rate for a torchrun run")
    saved = out / CHOICE_NAME
    earlier = json.loads(saved.read_text(encoding="utf-8")) if saved.is_file() else None
    if earlier is not None and earlier.get("how") == SEARCHES[tc.lr_search]:
        choice = earlier
    else:  # none yet, or made by the other search
        choice = choose(session, stopping)
        if choice is None:
            return False
        write_text_atomic(saved, json.dumps(choice, indent=2) + "\n")
    session.config = with_rate(session.config, choice["chosen"])
    return True


def with_rate(config: Any, rate: float) -> Any:
    return config.model_copy(update={"train": config.train.model_copy(update={"learning_rate": rate})})


def chosen_config(config: Any, out: Path) -> Any:
    """`config` with `auto` replaced by the rate this folder's run chose, if it chose one: what its
    config.yaml holds."""
    saved = out / CHOICE_NAME
    if config.train.learning_rate != "auto" or not saved.is_file():
        return config
    return with_rate(config, json.loads(saved.read_text(encoding="utf-8"))["chosen"])


def read_choice(out: Path) -> dict[str, Any] | None:
    """The choice a run made (for its summary and report), or None when its rate was given."""
    path = out / CHOICE_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def carve_validation(count: int, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, validation indices) of a training split of `count` examples: a seeded tenth (at
    least 1, at most 500) for validation."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    size = min(MAX_VALIDATION, max(1, int(count * VALIDATION_FRACTION)))
    if count - size < 1:
        raise ConfigError(f"train.learning_rate: auto needs at least 2 training examples, the data has {count}")
    return sorted(order[size:]), sorted(order[:size])


def choose(session: Any, stopping: Callable[[], bool] = lambda: False) -> dict[str, Any] | None:
    """The rate `train.lr_search` finds, with what it measured (None when `stopping()` said so during the
    search); the model and the random streams are as they were before it."""
    start = {n: p.detach().clone() for n, p in session.model.named_parameters() if p.requires_grad}
    rng = (torch.get_rng_state(), random.getstate())
    try:
        search = range_test if session.config.train.lr_search == "range" else successive_halving
        return search(session, start, stopping)
    finally:
        _restore(session.model, start)
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])


def successive_halving(session: Any, start: dict[str, torch.Tensor],
                       stopping: Callable[[], bool]) -> dict[str, Any] | None:
    """Successive halving over the method's candidate rates; returns the choice with every round's losses."""
    tc, method = session.config.train, session.config.method
    train_idx, val_idx = carve_validation(len(session.data.train_examples), tc.seed)
    examples = session.data.train_examples
    train, val = [examples[i] for i in train_idx], [examples[i] for i in val_idx]
    survivors, steps, rounds = list(CANDIDATES[method]), max(1, tc.max_steps // 10), []
    while True:
        losses = {}
        for rate in survivors:
            if stopping():
                return None
            _restore(session.model, start)
            losses[rate] = train_and_validate(session, train, val, rate, steps)
        rounds.append({"steps": steps, "validation_loss": {str(r): v for r, v in losses.items()}})
        survivors = sorted(survivors, key=lambda r: losses[r])[:max(1, len(survivors) // 2)]
        if len(survivors) == 1:
            break
        steps *= 2
    winner, last = survivors[0], rounds[-1]["steps"]
    chosen = for_run_length(winner, last, tc.max_steps, CANDIDATES[method])
    return {"chosen": chosen, "how": SEARCHES["halving"], "candidates": list(CANDIDATES[method]),
            "round_winner": winner, "validation_examples": len(val), "training_examples": len(train),
            "rounds": rounds,
            "why": f"{winner:g} had the lowest loss on {len(val)} examples carved from the training split after "
                   f"the last round ({last} steps; the held-out split was not read), scaled by "
                   f"sqrt({last}/{tc.max_steps}) for the run's length to the nearest candidate"}


def for_run_length(winner: float, round_steps: int, run_steps: int, candidates: tuple[float, ...]) -> float:
    """The candidate nearest to `winner` x sqrt(round_steps / run_steps): a rate that won a round of
    `round_steps` steps, scaled for a run of `run_steps`."""
    return nearest(winner * math.sqrt(min(1.0, round_steps / max(1, run_steps))), candidates)


def nearest(rate: float, candidates: tuple[float, ...]) -> float:
    """The candidate nearest to `rate` on a log scale (the lower on a tie)."""
    return min(candidates, key=lambda c: (round(abs(math.log(c / rate)), 9), c))


RANGE_SPAN = 10.0  # the range test starts this far below the lowest candidate and ends this far above the highest
RANGE_SMOOTHING = 0.9  # weight of the running mean in the smoothed loss (about ten steps at a fifth of 188)
RANGE_STOP = 4.0  # the test ends once the smoothed loss passes this multiple of its best


def range_test(session: Any, start: dict[str, torch.Tensor], stopping: Callable[[], bool]) -> dict[str, Any] | None:
    """One run of a fifth of the run's steps whose rate grows geometrically over the method's candidates
    (widened by `RANGE_SPAN` each way), reading the smoothed training loss; the choice is `range_choice`'s.

    As in fastai's finder, each step's loss (computed before that step's update) is paired with the step's
    rate, and the smoothing lags a few steps: both put the minimum at a higher rate than the one that caused
    it, which the division by ten absorbs in part. docs/quality.md measures the result against halving."""
    tc, method = session.config.train, session.config.method
    candidates = CANDIDATES[method]
    low, high = candidates[0] / RANGE_SPAN, candidates[-1] * RANGE_SPAN
    steps = max(2, tc.max_steps // 5)
    growth = (high / low) ** (1 / (steps - 1))
    run, order = _short_run(session, low, lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: growth ** k))
    curve, mean, best = [], 0.0, float("inf")
    while run.state.step < steps:
        if stopping():
            return None
        try:
            loss, _, rate = optimizer_step(run, order)
        except TrainingDiverged:
            break
        mean = RANGE_SMOOTHING * mean + (1 - RANGE_SMOOTHING) * loss
        smoothed = mean / (1 - RANGE_SMOOTHING ** run.state.step)
        curve.append([rate, smoothed])
        if not math.isfinite(smoothed) or smoothed > RANGE_STOP * best:
            break
        best = min(best, smoothed)
    choice = {"how": SEARCHES["range"], "candidates": list(candidates), "rounds": [], "curve": curve,
              "training_examples": len(session.data.train_examples)}
    if not curve:
        return {**choice, "chosen": candidates[0],
                "why": f"the loss diverged at the range test's first step (rate {low:g}), so the lowest candidate"}
    chosen, at_minimum = range_choice(curve, candidates)
    return {**choice, "chosen": chosen,
            "why": f"the smoothed training loss of one {len(curve)}-step run, its rate growing from {low:g} to "
                   f"{high:g}, was lowest at {at_minimum:.3g}; a tenth of that, to the nearest candidate (only the "
                   "training split was read)"}


def range_choice(curve: list[list[float]], candidates: tuple[float, ...]) -> tuple[float, float]:
    """(the candidate nearest a tenth of the rate where the smoothed loss was lowest, that rate); `curve` holds
    [rate, smoothed loss] pairs, at least one."""
    at_minimum = min(curve, key=lambda point: point[1])[0]
    return nearest(at_minimum / RANGE_SPAN, candidates), at_minimum


def train_and_validate(session: Any, train: list, val: list, rate: float, steps: int,
                       report: Callable[[int, float], None] | None = None, every: int = 0) -> float:
    """Validation loss after `steps` steps at `rate` from the model as it is (inf if it diverged); with
    `every`, `report(step, loss)` hears the validation loss every `every` steps too (it may raise to stop).

    The steps are the run's own (`run_step.optimizer_step`): step k trains global batch k of the seeded order
    over `train`, as the run does over the whole training split, with the run's schedule shortened to `steps`."""
    tc = session.config.train
    part = dataclasses.replace(session, data=dataclasses.replace(session.data, train=DataSplit(examples=train)))
    run, order = _short_run(part, rate, lambda optimizer: build_scheduler(
        optimizer, tc.warmup_steps * steps // tc.max_steps, steps, tc.schedule))
    try:
        while run.state.step < steps:
            optimizer_step(run, order)
            if report and every and run.state.step % every == 0 and run.state.step < steps:
                report(run.state.step, validation_loss(session, val))
                session.model.train()
    except TrainingDiverged:
        return float("inf")
    return validation_loss(session, val)


def _short_run(session: Any, rate: float, scheduler_for: Callable[[torch.optim.Optimizer], Any]) -> tuple[Run, Any]:
    """A search's run over `session`'s training examples through the run's own steps and batch order, writing
    nothing; every search run starts from the same random streams (the same dropout masks). Its optimizer is
    built after the model is wrapped for training, as the run's is: sharding replaces the parameters."""
    trainer, tc = trainer_for(session), session.config.train
    optimizer = build_optimizer(session.model, rate, tc.weight_decay, tc.lora_plus_ratio)
    run = Run(session, Path(session.config.output_dir), optimizer, scheduler_for(optimizer), RunState(), {}, [],
              trainer=trainer)
    torch.manual_seed(session.config.train.seed)
    session.model.train()
    return run, batch_order(session)


def validation_loss(session: Any, val: list) -> float:
    """Mean loss on `val` (inf when it is not finite: the training diverged)."""
    totals = loss_totals(session.forwards(), val, session.batches, task=session.config.model.task)
    value = loss_metrics(totals, session.config.model.task)["loss"]
    return value if value == value else float("inf")  # NaN: diverged


def _restore(model: torch.nn.Module, start: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in start:
                param.copy_(start[name])
            param.grad = None

