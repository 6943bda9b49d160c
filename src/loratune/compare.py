"""`loratune compare`: the same task trained by several methods on the same split, side by side.

Each (method, seed) runs in its own Python process, so each peak memory is that run's alone (a process's
peak resident size never goes down). "base" is the untrained model for causal LMs (zero-shot: label scoring
or generation on the held-out split) and a head-only linear probe for classifiers. The split is the data
section's (`data.seed`); seeds change `train.seed` only. Everything is written into the config's
`output_dir`: one folder per run, `compare.json`, `compare.md` and `compare.png`.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from loratune.core.atomic_write import atomic_path, write_text_atomic
from loratune.core.errors import ConfigError, LoratuneError
from loratune.extras import has_extra

METHODS = ("base", "lora", "full")
#: The headline metric, first found; True where higher is better.
METRICS = (("accuracy", True), ("bleu", True), ("perplexity", False), ("loss", False))
JOB_NAME = "compare-job.json"


def compare(config: Any, methods: list[str], seeds: int) -> dict[str, Any]:
    """Run every method `seeds` times (zero-shot base once) and write the table and plot; returns the results."""
    out = Path(config.output_dir)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"--methods: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}")
    if (out / "compare.md").exists() or any((out / _folder(m, 0)).exists() for m in methods):
        raise ConfigError(f"{out}: holds an earlier comparison; set output_dir to a new folder")
    data = config.model_dump(mode="json")
    first_seed = config.train.seed
    for method in methods:  # a method the config cannot run is a one-line error before any run starts
        job_config(data, method, first_seed, out / _folder(method, first_seed))
    runs = []
    for method in methods:
        for seed in range(first_seed, first_seed + (1 if _zero_shot(method, config) else seeds)):
            print(f"loratune: compare: {method} (seed {seed}) in {out / _folder(method, seed)}", file=sys.stderr)
            runs.append(_run_in_child(data, method, seed, out / _folder(method, seed)))
    results = {"model": config.model.name, "task": config.model.task, "data": config.data.train,
               "data_seed": config.data.seed, "seeds": seeds, "runs": runs, "rows": summarise(runs)}
    write_text_atomic(out / "compare.json", json.dumps(results, indent=2) + "\n")
    plotted = has_extra("plot")  # without matplotlib the table stands alone
    write_text_atomic(out / "compare.md", compare_markdown(results, plotted))
    if plotted:
        plot_compare(out / "compare.png", results)
    return results


def _zero_shot(method: str, config: Any) -> bool:
    return method == "base" and config.model.task != "classification"


def job_config(data: dict[str, Any], method: str, seed: int, output_dir: Path) -> Any:
    """The validated config of one comparison run: the user's, with the job's method, seed and folder. The
    zero-shot base of a causal LM keeps the config's own method (a fresh adapter adds nothing: B starts at 0);
    a classifier's base is the head-only probe. `model.dtype` (the frozen base's storage) is the LoRA run's
    alone: full fine-tuning and the probe keep float32 weights."""
    from loratune.train.run_config import validate_config

    zero_shot = method == "base" and data["model"]["task"] != "classification"
    run_method = data.get("method", "lora") if zero_shot else "head" if method == "base" else method
    model = data["model"] if run_method == "lora" else {k: v for k, v in data["model"].items() if k != "dtype"}
    job = {**data, "model": model, "method": run_method, "train": {**data["train"], "seed": seed},
           "output_dir": str(output_dir)}
    return validate_config(job, f"compare --methods {method}")


def _folder(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def _run_in_child(data: dict[str, Any], method: str, seed: int, folder: Path) -> dict[str, Any]:
    """One run in a fresh Python process; its measurements come back through a file in its folder."""
    folder.mkdir(parents=True, exist_ok=True)
    job = folder / JOB_NAME
    write_text_atomic(job, json.dumps({"config": data, "method": method, "seed": seed}))
    code = ("import sys; from loratune.import_noise import quiet_libraries; quiet_libraries(); "
            "from loratune.compare import run_job; sys.exit(run_job(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", code, str(job)], check=False)
    result = json.loads(job.read_text(encoding="utf-8"))
    if "error" in result:
        raise LoratuneError(f"compare: {method} (seed {seed}): {result['error']}")
    if done.returncode or "metrics" not in result:
        raise LoratuneError(f"compare: the {method} run (seed {seed}) ended with exit code {done.returncode}; "
                            f"its folder: {folder}")
    return result


def run_job(job_path: str) -> int:
    """The child's side: run the job in `job_path`, then write its measurements (or its error) back there."""
    from loratune.train.loop import fit

    job = Path(job_path)
    spec = json.loads(job.read_text(encoding="utf-8"))
    method, seed = spec["method"], spec["seed"]
    try:
        config = job_config(spec["config"], method, seed, job.parent / "run")
        if _zero_shot(method, config):
            summary = zero_shot_summary(config)
        else:
            summary = fit(config, quiet=True)
    except LoratuneError as exc:
        write_text_atomic(job, json.dumps({**spec, "error": str(exc)}))
        return 2
    write_text_atomic(job, json.dumps({"method": method, "seed": seed, **measurements(summary)}))
    return 0


def zero_shot_summary(config: Any) -> dict[str, Any]:
    """The untrained model's evaluation, as a run summary with no training."""
    from loratune.train.loop import peak_rss_mb
    from loratune.train.session import prepare

    session = prepare(config, quiet=True)
    metrics = session.evaluate().metrics
    return {"after": metrics, "train_seconds": 0.0, "peak_rss_mb": peak_rss_mb(), "peak_cuda_mb": None,
            "trainable_parameters": 0, "adapter_dir": None}


def measurements(summary: dict[str, Any]) -> dict[str, Any]:
    """What the table needs from a run's summary."""
    saved = summary.get("adapter_dir")
    size = sum(f.stat().st_size for f in Path(saved).rglob("*") if f.is_file()) if saved else 0
    return {"metrics": summary["after"], "train_seconds": summary["train_seconds"],
            "peak_rss_mb": summary["peak_rss_mb"], "peak_cuda_mb": summary.get("peak_cuda_mb"),
            "trainable_parameters": summary["trainable_parameters"], "output_bytes": size}


def headline_metric(metrics: dict[str, Any]) -> tuple[str, bool]:
    """(name, higher is better) of the task metric a comparison ranks by."""
    for name, higher in METRICS:
        if name in metrics:
            return name, higher
    raise LoratuneError("compare: the runs reported no task metric (is there a held-out split?)")


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: the metric's mean and sample standard deviation over seeds, and mean costs."""
    name, _ = headline_metric(runs[0]["metrics"])
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        values = [r["metrics"][name] for r in mine]
        rows.append({"method": method, "metric": name, "values": values, "mean": statistics.fmean(values),
                     "sd": statistics.stdev(values) if len(values) > 1 else None,
                     "train_seconds": statistics.fmean(r["train_seconds"] for r in mine),
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
                     "trainable_parameters": mine[0]["trainable_parameters"],
                     "output_mb": mine[0]["output_bytes"] / 2**20,
                     **_extra_means(mine)})
    return rows


def _extra_means(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Other comparable metrics' means (the unbiased label accuracy's summed twin, general-text perplexity)."""
    found = {}
    for key in ("accuracy_summed", "general_perplexity"):
        values = [r["metrics"][key] for r in runs if key in r["metrics"]]
        if len(values) == len(runs):
            found[key] = statistics.fmean(values)
    return found


def _label(row: dict[str, Any], task: str) -> str:
    if row["method"] == "base":
        return "base (linear probe)" if task == "classification" else "base (zero-shot)"
    return {"lora": "LoRA", "full": "full fine-tuning"}.get(row["method"], row["method"])


def compare_markdown(results: dict[str, Any], plotted: bool = True) -> str:
    """The comparison table with what it was measured on."""
    rows, task = results["rows"], results["task"]
    name = rows[0]["metric"]
    extras = [k for k in ("accuracy_summed", "general_perplexity") if all(k in r for r in rows)]
    lines = [f"# loratune compare: {results['model']} on {results['data']}", "",
             f"Each method on the same split (data.seed {results['data_seed']}), {results['seeds']} seed(s) of "
             "train.seed each (the zero-shot base once); each run in its own process, so its peak memory is its "
             "own. Metric: held-out " + name + (" (mean ± sample sd over seeds)." if results["seeds"] > 1 else "."),
             "", f"| method | {name} | " + "".join(f"{k} | " for k in extras)
             + "training time (s) | peak memory (MiB RSS) | trainable parameters | output size (MB) |",
             "|---|---|" + "---|" * len(extras) + "---|---|---|---|"]
    for row in rows:
        spread = f" ± {row['sd']:.4f}" if row["sd"] is not None else ""
        lines.append(f"| {_label(row, task)} | {row['mean']:.4f}{spread} | "
                     + "".join(f"{row[k]:.4f} | " for k in extras)
                     + f"{row['train_seconds']:.1f} | {row['peak_rss_mb']:.0f} | {row['trainable_parameters']:,} | "
                     f"{row['output_mb']:.2f} |")
    lines += ["", "Per seed: " + "; ".join(f"{r['method']}: " + ", ".join(f"{v:.4f}" for v in r["values"])
                                          for r in rows)] + (["", "![comparison](compare.png)"] if plotted else [])
    return "\n".join(lines) + "\n"


def plot_compare(path: Path, results: dict[str, Any]) -> None:
    """The metric per method (mean, sd bars, each seed a dot) beside the training time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, task = results["rows"], results["task"]
    labels = [_label(r, task) for r in rows]
    fig, (metric_ax, time_ax) = plt.subplots(1, 2, figsize=(10, 4))
    places = range(len(rows))
    metric_ax.bar(places, [r["mean"] for r in rows], yerr=[r["sd"] or 0 for r in rows], capsize=4, alpha=0.7)
    for place, row in zip(places, rows):
        metric_ax.plot([place] * len(row["values"]), row["values"], "k.")
    metric_ax.set_ylabel(rows[0]["metric"])
    time_ax.bar(places, [r["train_seconds"] for r in rows], alpha=0.7)
    time_ax.set_ylabel("training time (s)")
    for ax in (metric_ax, time_ax):
        ax.set_xticks(list(places), labels, rotation=15)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{results['model']} on {results['data']}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
