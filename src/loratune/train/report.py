"""What a run leaves behind besides the adapter: metrics.json, a training plot and report.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from loratune.core.atomic_write import atomic_path, write_text_atomic
from loratune.extras import has_extra

NO_PLOT = "training plots need the plot extra: pip install 'loratune[plot]'"


def write_metrics(path: Path, summary: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(summary, indent=2, default=str) + "\n")


def plot_history(path: Path, history: list[dict[str, Any]], title: str) -> None:
    """Training loss per step with evaluation loss on top, and eval task metrics on a second panel; without
    the plot extra, one line says so and the report goes without the plot."""
    if not has_extra("plot"):
        print(f"loratune: no {path.name}: {NO_PLOT}", file=sys.stderr)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in history if r["kind"] == "train"]
    evals = [r for r in history if r["kind"] == "eval"]
    metric_names = sorted({k for r in evals for k in r if k in ("accuracy", "macro_f1", "bleu", "chrf")})
    fig, axes = plt.subplots(1, 2 if metric_names else 1, figsize=(11 if metric_names else 6, 4), squeeze=False)
    loss_ax = axes[0][0]
    loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if evals:
        loss_ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval loss")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    if metric_names:
        metric_ax = axes[0][1]
        for name in metric_names:
            points = [(r["step"], r[name]) for r in evals if name in r]
            metric_ax.plot(*zip(*points), "o-", label=name)
        metric_ax.set_xlabel("step")
        metric_ax.set_title("evaluation")
        metric_ax.legend()
        metric_ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _metric_rows(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    rows = ["| metric | before | after |", "|---|---|---|"]
    for key in after:
        if isinstance(after[key], (int, float)):
            rows.append(f"| {key} | {_fmt(before.get(key))} | {_fmt(after[key])} |")
    return rows


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_report(path: Path, summary: dict[str, Any], config_yaml: str) -> None:
    """A short human-readable account of the run."""
    lines = [f"# loratune run: {summary['model']}", ""]
    lines += [f"- task: {summary['task']}, data: {summary['data']['train']} "
              f"({summary['data']['train_examples']} training / {summary['data']['eval_examples']} evaluation "
              f"examples, {summary['data'].get('skipped_records', 0)} bad records skipped)",
              f"- method: {summary.get('method', 'lora')} (result in `{summary.get('adapter_dir', '')}`)",
              f"- trainable parameters: {summary['trainable_parameters']:,} of {summary['total_parameters']:,} "
              f"({100 * summary['trainable_fraction']:.3f}%)",
              _global_batch_line(summary),
              f"- steps: {summary['steps']}{' (stopped early)' if summary.get('stopped_early') else ''}, "
              f"training time {summary['train_seconds']:.1f} s, {summary['tokens_per_second']:.0f} tokens/s",
              f"- peak memory: {summary['peak_rss_mb']:.0f} MiB RSS ({summary.get('malloc', 'system')} malloc)"
              + (f", {summary['peak_cuda_mb']:.0f} MiB CUDA" if summary.get("peak_cuda_mb") else "")
              + f"; gradient checkpointing {summary.get('gradient_checkpointing', 'off')}",
              f"- precision: {summary['precision']}" + (
                  f" (frozen linear weights kept in {summary['widened_from']}, widened for each product)"
                  if summary.get("widened_from") else ""), "", "## Metrics", ""]
    lines += _metric_rows(summary["before"], summary["after"])
    lines += _learning_rate_lines(summary.get("learning_rate_choice"))
    for name in ("before", "after"):
        samples = summary.get(f"samples_{name}") or []
        if samples:
            lines += ["", f"## Samples {name} training", ""]
            for sample in samples:
                lines += [f"- prompt: `{_one_line(sample['prompt'], keep_end=True)}`",
                          f"  - output: `{_one_line(sample['output'])}`",
                          f"  - reference: `{_one_line(sample['reference'])}`"]
    plot = "![training](plot.png)" if (path.parent / "plot.png").is_file() else f"No plot: {NO_PLOT}."
    lines += ["", "## Plot", "", plot, "", "## Config", "", "```yaml", config_yaml.rstrip(), "```"]
    write_text_atomic(path, "\n".join(lines) + "\n")


def _learning_rate_lines(choice: dict[str, Any] | None) -> list[str]:
    """What `train.learning_rate: auto` chose, and why: every round's validation losses (successive halving)
    or the smoothed loss at each step (a range test)."""
    if not choice:
        return []
    lines = ["", "## Learning rate", "", f"train.learning_rate: auto chose {choice['chosen']:g} by {choice['how']}: "
             f"{choice['why']}.", ""]
    if "curve" in choice:
        lines += ["| step | rate | smoothed training loss |", "|---|---|---|"]
        return lines + [f"| {step} | {rate:.3g} | {loss:.4f} |" for step, (rate, loss) in enumerate(choice["curve"], 1)]
    candidates = choice["candidates"]
    lines += ["| steps | " + " | ".join(f"{float(r):g}" for r in candidates) + " |", "|---|" + "---|" * len(candidates)]
    for entry in choice["rounds"]:
        losses = entry["validation_loss"]
        lines.append(f"| {entry['steps']} | " + " | ".join(
            f"{losses[str(r)]:.4f}" if str(r) in losses else "" for r in candidates) + " |")
    return lines


def _global_batch_line(summary: dict[str, Any]) -> str:
    batch = summary["global_batch"]
    return (f"- global batch: {batch['examples']} examples per step ({batch['per_process']} per process x "
            f"{batch['processes']} process(es) x {batch['grad_accum']} accumulation step(s))")


def _one_line(text: str, limit: int = 200, keep_end: bool = False) -> str:
    """Flatten to one line; long prompts keep their end, which is where the question is."""
    flat = " ".join(str(text).split()).replace("`", "'")
    if len(flat) <= limit:
        return flat
    return "..." + flat[3 - limit:] if keep_end else flat[: limit - 3] + "..."
