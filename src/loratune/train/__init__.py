"""Training: the run config, the loop (`fit`), evaluation, checkpoints and the report."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from loratune.train.loop import evaluate_run, fit
from loratune.train.run_config import RunConfig, TrainSpec, load_config, validate_config


def demo_config(output_dir: str | Path = "runs/demo", overrides: list[str] | None = None) -> RunConfig:
    """The embedded demo's config (`train/demo.yaml`), with its output folder and any `--set` overrides."""
    from loratune.train.run_config import apply_override

    data = yaml.safe_load(resources.files(__package__).joinpath("demo.yaml").read_text(encoding="utf-8"))
    data["output_dir"] = str(output_dir)
    for assignment in overrides or []:
        apply_override(data, assignment)
    return validate_config(data, "demo config")


__all__ = ["RunConfig", "TrainSpec", "demo_config", "evaluate_run", "fit", "load_config"]
