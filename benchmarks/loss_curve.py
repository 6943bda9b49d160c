"""Does the fast default path learn the same thing? Train the real SmolLM2 for 20 steps on the same
movie-review text twice, with loratune's default (bf16 base, bf16 autocast) and an fp32 reference, and
compare the loss at every step."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.report import RESULTS_DIR

STEPS = 20


def run_config(precision: str, output_dir: Path) -> dict[str, Any]:
    return {
        "model": {"name": "smollm2-135m-instruct", "task": "causal-lm"},
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": "movie-sentiment", "format": "text", "max_length": 256, "max_train_records": 4000,
                 "max_eval_records": 16},
        "train": {"max_steps": STEPS, "batch_size": 4, "learning_rate": 3e-4, "warmup_steps": 2,
                  "precision": precision, "generation_eval": False, "num_samples": 0, "seed": 0},
        "output_dir": str(output_dir),
    }


def train_losses(precision: str) -> list[float]:
    from loratune.train import fit
    from loratune.train.run_config import validate_config

    with tempfile.TemporaryDirectory() as tmp:
        fit(validate_config(run_config(precision, Path(tmp)), "loss-curve"), quiet=True)
        lines = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["kind"] == "train"]


def run_loss_curve() -> int:
    reference, fast = train_losses("fp32"), train_losses("auto")
    relative = [abs(f - r) / r for f, r in zip(fast, reference)]
    result = {"steps": STEPS, "fp32": reference, "default": fast, "max_relative_diff": max(relative),
              "relative_diff": relative}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "loss_curve.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, RESULTS_DIR / "loss_curve.png")
    print(f"loss curve over {STEPS} steps: max relative difference default vs fp32 = {max(relative):.4f}")
    for step, (r, f) in enumerate(zip(reference, fast), start=1):
        print(f"  step {step:2d}: fp32 {r:.4f}  default {f:.4f}  ({100 * abs(f - r) / r:.2f}%)")
    return 0


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = range(1, result["steps"] + 1)
    ax.plot(steps, result["fp32"], "o-", label="fp32 reference")
    ax.plot(steps, result["default"], "s--", label="loratune default (bf16)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("SmolLM2-135M, all-linear r16, movie-review text")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
