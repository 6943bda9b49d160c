"""Run every configuration of every case in fresh subprocesses, alternating them, and aggregate medians."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.cases import Case, Variant, unavailable_reason
from benchmarks.libs import BASELINES, CONFIG_ORDER, unavailable_config
from benchmarks.worker import timed

REPO_ROOT = Path(__file__).resolve().parent.parent
CHILD_TIMEOUT_S = 3600
#: Raw per-run values that are not aggregated as metrics.
NOT_METRICS = {"status", "reason", "step_times", "last_loss", "precision"}
#: Metrics shown per configuration but not compared as loratune / PEFT.
NO_RATIO = {"load_1min", "step_gflop", "gflops_per_s", "ceiling_share"}


@dataclass(frozen=True)
class RunOptions:
    """How much to measure: steps, warm-up, A/B rounds, device, threads, tiny shapes."""

    steps: int = 5
    warmup: int = 3
    repeats: int = 3
    device: str = "cpu"
    threads: int = torch.get_num_threads()
    quick: bool = False
    #: Measured matmul ceilings in GFLOP/s by precision ("fp32", "bf16"), for the utilisation metric.
    ceilings: dict[str, float] | None = None


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_child(case: Case, variant: Variant, config: str, options: RunOptions) -> dict[str, Any]:
    """One configuration in a fresh interpreter; returns its raw result (or a 'failed' status)."""
    spec = {"case": case.name, "variant": variant.name, "config": config, "quick": options.quick,
            "steps": options.steps, "warmup": options.warmup, "device": options.device, "threads": options.threads,
            "ceilings": options.ceilings or {}}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory(prefix="loratune-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "benchmarks.worker", str(spec_path), str(out_path)]
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                                  timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "reason": f"timed out after {CHILD_TIMEOUT_S} s"}
        if out_path.is_file():
            result = json.loads(out_path.read_text())
            if result["status"] == "failed":
                log(proc.stderr[-3000:])
            return result
        log(proc.stderr[-3000:])
        return {"status": "failed", "reason": f"worker exited with {proc.returncode} and wrote no result"}


def gemm_ceiling(dtype: torch.dtype, device: str, threads: int) -> float:
    """Best GFLOP/s of square matmuls in `dtype`, sizes doubling from 256 to 4096; growth stops once one
    product takes 0.25 s, so an emulated dtype costs seconds. Each size: median of 3 samples of `reps`
    products, `reps` chosen so a sample lasts about 20 ms."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        best, n = 0.0, 256
        while n <= 4096:
            a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
            once = timed(lambda a=a, b=b: torch.mm(a, b), 1, 1, device)[0]
            reps = max(1, min(100, int(0.02 / max(once, 1e-6))))
            sample = timed(lambda a=a, b=b, k=reps: [torch.mm(a, b) for _ in range(k)], 0, 3, device)
            best = max(best, 2 * n**3 / (statistics.median(sample) / reps) / 1e9)
            if once >= 0.25:
                break
            n *= 2
        return best
    finally:
        torch.set_num_threads(previous)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def measure_ceilings(device: str, threads: int) -> dict[str, float]:
    """The GEMM ceiling of each precision on this machine, measured once per run in the parent."""
    return {"fp32": gemm_ceiling(torch.float32, device, threads), "bf16": gemm_ceiling(torch.bfloat16, device, threads)}


def summarize(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max across repeats of each numeric metric of one configuration."""
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return {"status": runs[0]["status"] if runs else "failed", "reason": runs[0].get("reason", "") if runs else ""}
    keys = [k for k, v in ok[0].items() if k not in NOT_METRICS and isinstance(v, (int, float))]
    metrics = {k: summarize([float(r[k]) for r in ok]) for k in keys}
    out: dict[str, Any] = {"status": "ok", "runs": len(ok), "metrics": metrics, "precision": ok[0].get("precision")}
    if len(ok) < len(runs):
        out["failed_runs"] = [r.get("reason", "") for r in runs if r["status"] != "ok"]
    return out


def ratios(configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """loratune's median over each PEFT baseline's median, per metric."""
    ours = configs.get("loratune", {})
    out: dict[str, dict[str, float]] = {}
    for base in BASELINES:
        theirs = configs.get(base, {})
        if ours.get("status") != "ok" or theirs.get("status") != "ok":
            continue
        out[base] = {k: v["median"] / theirs["metrics"][k]["median"] for k, v in ours["metrics"].items()
                     if k in theirs["metrics"] and theirs["metrics"][k]["median"] and k not in NO_RATIO}
    return out


def run_variant(case: Case, variant: Variant, options: RunOptions) -> dict[str, Any]:
    """All configurations of one case variant, alternated round by round (A, B, C, A, B, C, ...)."""
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIG_ORDER}
    for round_index in range(options.repeats):
        for config in CONFIG_ORDER:
            if runs[config] and runs[config][0]["status"] == "unavailable":
                continue
            skip = unavailable_config(config, options.device)
            if skip:
                runs[config].append({"status": "unavailable", "reason": skip})
                continue
            start = time.perf_counter()
            result = run_child(case, variant, config, options)
            runs[config].append(result)
            log(f"[{case.name}/{variant.name}] round {round_index + 1}/{options.repeats} {config}: "
                f"{_headline(result)} ({time.perf_counter() - start:.1f} s)")
    configs = {c: aggregate(r) for c, r in runs.items()}
    statuses = {c["status"] for c in configs.values()}
    status = "ok" if "ok" in statuses else ("unavailable" if statuses == {"unavailable"} else "failed")
    reason = "; ".join(sorted({c.get("reason", "") for c in configs.values() if c["status"] != "ok"}))
    return {**_row_header(case, variant), "status": status, "reason": reason, "configs": configs,
            "ratios": ratios(configs)}


def _headline(result: dict[str, Any]) -> str:
    if result["status"] != "ok":
        return f"{result['status']}: {result.get('reason', '')}"
    if "step_s" in result:
        return f"{result['step_s']:.3f} s/step, {result['tokens_per_s']:.0f} tok/s, {result['peak_rss_mb']:.0f} MB"
    return f"mixed {result['mixed_tokens_per_s']:.0f} tok/s, single {result['single_tokens_per_s']:.0f} tok/s"


def _row_header(case: Case, variant: Variant) -> dict[str, Any]:
    return {"case": case.name, "variant": variant.name, "kind": case.kind, "description": case.description,
            "batch": case.batch, "seq_len": case.seq_len, "r": variant.r,
            "targets": variant.target_spec, "lora_alpha": 2 * variant.r}


def run_suite(cases: list[Case], options: RunOptions) -> dict[str, Any]:
    """Every variant of every case; cases that cannot run here get an 'unavailable' row instead."""
    start = time.perf_counter()
    rows = []
    for case in cases:
        reason = unavailable_reason(case, options.quick)
        for variant in case.variants:
            if reason:
                log(f"[{case.name}/{variant.name}] {reason}")
                rows.append({**_row_header(case, variant), "status": "unavailable", "reason": reason, "configs": {},
                             "ratios": {}})
            else:
                rows.append(run_variant(case, variant, options))
    meta = environment(options, time.perf_counter() - start)
    meta["max_load_1min"] = max_load(rows)
    meta["gemm_ceiling_gflops"] = options.ceilings
    return {"meta": meta, "rows": rows}


def max_load(rows: list[dict[str, Any]]) -> float | None:
    """The highest 1-minute load average any configuration saw: a sign of other work competing for the CPU."""
    loads = [m["load_1min"]["max"] for row in rows for c in row["configs"].values()
             for m in [c.get("metrics", {})] if "load_1min" in m]
    return max(loads) if loads else None


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    """The CPU's flags as `lscpu` prints them: speed on a CPU depends on AVX-512, AVX512-BF16, VNNI and AMX."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Flags")), "unknown")


def environment(options: RunOptions, wall_s: float) -> dict[str, Any]:
    """Versions, hardware and settings recorded with every result file."""
    import peft
    import transformers

    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "threads": options.threads, "device": options.device, "steps": options.steps, "warmup": options.warmup,
            "repeats": options.repeats, "quick": options.quick, "configs": list(CONFIG_ORDER),
            "command": "python -m benchmarks " + " ".join(sys.argv[1:]), "wall_s": round(wall_s, 1)}
    if options.device.startswith("cuda") and torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name()
    return meta
