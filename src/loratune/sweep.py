"""`loratune sweep`: search the learning rate and (for LoRA) rank, alpha and target modules with Optuna.

Each trial trains the config's `train.max_steps` from a fresh model and is scored by its loss on a tenth
carved from the training split (as `learning_rate: auto` does: the held-out split is never read, so it stays a
fair test of the winner). A trial reports its validation loss four times; Optuna's median pruner stops one
that is worse than the median of earlier trials at the same step.

The study lives in an Optuna storage: by default SQLite in the output folder, so a killed sweep resumes where
it stopped; any storage URL (a database server) lets several machines share one sweep. Workers agree on the
trial count through the trial numbers the storage hands out: a trial runs only when fewer than `--trials`
unfailed trials have lower numbers, so no worker runs a trial beyond the budget, and each trial is one worker's.
A worker killed mid-trial leaves that trial running in the storage; its heartbeat stops, and once the grace
period has passed the next worker marks it failed and runs its settings again.
"""

from __future__ import annotations

import datetime
import os
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

from loratune.core.atomic_write import write_text_atomic
from loratune.core.errors import ConfigError, LoratuneError

RATE_RANGES = {"lora": (1e-5, 1e-2), "full": (1e-6, 1e-3), "head": (1e-4, 1e-1)}
RANKS = (4, 8, 16, 32)
ALPHA_PER_RANK = (1, 2, 4)
REPORTS = 4  # validation losses a trial reports for pruning


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise LoratuneError("loratune sweep needs Optuna: pip install 'loratune[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a surplus trial is recorded as failed, not an error
    return optuna


def open_study(config: Any, storage: str | None, name: str | None, heartbeat: float = 10.0) -> Any:
    """The sweep's study, created or loaded (default: SQLite `sweep.db` in the output folder)."""
    optuna = _optuna()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(out / 'sweep.db').resolve()}"
    sampler = optuna.samplers.TPESampler(seed=(config.train.seed * 1_000_003 + os.getpid()) % 2**31)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    for attempt in range(6):  # workers starting together on a new database race to create its tables
        try:
            with warnings.catch_warnings():  # heartbeats are marked experimental
                warnings.simplefilter("ignore")
                rdb = optuna.storages.RDBStorage(
                    url, heartbeat_interval=max(1, int(heartbeat)), grace_period=max(2, int(3 * heartbeat)),
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2))
                return optuna.create_study(study_name=name or "loratune-sweep", storage=rdb, sampler=sampler,
                                           pruner=pruner, direction="minimize", load_if_exists=True)
        except Exception as exc:  # a bad URL or an unreachable server: say which
            error = exc
            time.sleep(0.2 * (attempt + 1))
    raise ConfigError(f"--storage {url}: {type(error).__name__}: {str(error).splitlines()[0]}") from None


def sweep(config: Any, trials: int, storage: str | None = None, name: str | None = None,
          heartbeat: float = 10.0) -> dict[str, Any]:
    """Run trials until the study holds `trials` unfailed ones; write `sweep.md` and `best.yaml`."""
    study = open_study(config, storage, name, heartbeat)

    def objective(trial: Any) -> float:
        if _earlier_trials(study, trial.number) >= trials:  # the budget is spent (by any worker): stop here
            study.stop()
            raise _Surplus()
        trial.set_user_attr("worker", os.getpid())
        return run_trial(config, trial)

    _fail_orphans(study, 3 * heartbeat)
    if _earlier_trials(study, 1 << 62) < trials:  # optimize also fails trials left stale by a killed worker
        study.optimize(objective, catch=(_Surplus,))
    return write_results(config, study)


def _fail_orphans(study: Any, grace: float) -> None:
    """Fail running trials that a worker created but died before starting (no heartbeat ever covered them, so
    Optuna would count them as running for ever): those without the `worker` mark, older than the grace period."""
    import optuna

    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        started = trial.datetime_start
        if "worker" not in trial.user_attrs and started and (now - started).total_seconds() > grace:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


class _Surplus(Exception):
    """A trial created after the budget was spent; it is recorded as failed and not run."""


def _earlier_trials(study: Any, number: int) -> int:
    """Trials numbered below `number` that ran, run or will run (failed ones are retried under a new number)."""
    states = {"RUNNING", "COMPLETE", "PRUNED", "WAITING"}
    return sum(1 for t in study.get_trials(deepcopy=False) if t.number < number and t.state.name in states)


def trial_config(config: Any, trial: Any) -> Any:
    """`config` with the trial's learning rate and, for LoRA, rank, alpha and target modules."""
    data = config.model_dump(mode="json")
    low, high = RATE_RANGES[config.method]
    data["train"]["learning_rate"] = trial.suggest_float("learning_rate", low, high, log=True)
    if config.method == "lora":
        rank = trial.suggest_categorical("r", list(RANKS))
        data["lora"]["r"] = rank
        data["lora"]["lora_alpha"] = rank * trial.suggest_categorical("alpha_per_rank", list(ALPHA_PER_RANK))
        given = config.lora.target_modules
        choices = ["config", "all-linear"] if given != "all-linear" else ["all-linear"]
        if trial.suggest_categorical("targets", choices) == "all-linear":
            data["lora"]["target_modules"] = "all-linear"
    return type(config).model_validate(data)


def run_trial(config: Any, trial: Any) -> float:
    """Train the trial's config from a fresh model; its loss on the carved validation part (lower is better)."""
    import optuna

    from loratune.train.auto_lr import carve_validation, train_and_validate
    from loratune.train.session import prepare

    settings = trial_config(config, trial)
    session = prepare(settings, quiet=True)
    examples = session.data.train_examples
    train_idx, val_idx = carve_validation(len(examples), settings.train.seed)

    def report(step: int, loss: float) -> None:
        trial.report(loss, step)
        if trial.should_prune():
            raise optuna.TrialPruned()

    steps = settings.train.max_steps
    return train_and_validate(session, [examples[i] for i in train_idx], [examples[i] for i in val_idx],
                              settings.train.learning_rate, steps, report, max(1, steps // REPORTS))


def write_results(config: Any, study: Any) -> dict[str, Any]:
    """`sweep.md` (every trial, the best and why) and `best.yaml` (the config with the best settings)."""
    out = Path(config.output_dir)
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED")]
    complete = [t for t in done if t.state.name == "COMPLETE" and t.value is not None]
    result = {"trials": [{"number": t.number, "state": t.state.name.lower(), "params": t.params,
                          "value": t.value} for t in done], "best": None}
    lines = [f"# loratune sweep: {config.model.name} on {config.data.train}", "",
             f"Optuna study `{study.study_name}`: {len(complete)} complete and {len(done) - len(complete)} pruned "
             "trials. Score: loss on a tenth carved from the training split after train.max_steps steps (the "
             "held-out split is never read); lower is better.", "",
             "| trial | state | learning rate | r | alpha / r | targets | validation loss |",
             "|---|---|---|---|---|---|---|"]
    for t in sorted(done, key=lambda t: t.number):
        p = t.params
        value = f"{t.value:.4f}" if t.value is not None else "(pruned)"
        lines.append(f"| {t.number} | {t.state.name.lower()} | {p.get('learning_rate', 0):.2e} | {p.get('r', '')} | "
                     f"{p.get('alpha_per_rank', '')} | {p.get('targets', '')} | {value} |")
    if complete:
        best = min(complete, key=lambda t: t.value)
        result["best"] = {"number": best.number, "params": best.params, "value": best.value}
        chosen = trial_config(config, _Fixed(best.params)).model_dump(mode="json")
        chosen["output_dir"] = str(out / "best")
        write_text_atomic(out / "best.yaml", yaml.safe_dump(chosen, sort_keys=False))
        lines += ["", f"Best: trial {best.number} (validation loss {best.value:.4f}), the lowest of the complete "
                  f"trials; `best.yaml` is the config with its settings: `loratune train {out / 'best.yaml'}` "
                  f"trains it into {out / 'best'} and reports its held-out metrics."]
    write_text_atomic(out / "sweep.md", "\n".join(lines) + "\n")
    return result


class _Fixed:
    """A stand-in trial that suggests the given parameters (to rebuild the best trial's config)."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params

    def suggest_float(self, name: str, *args: Any, **kwargs: Any) -> float:
        return self.params[name]

    def suggest_categorical(self, name: str, choices: list) -> Any:
        return self.params[name]
