"""One configuration in its own process: `python -m benchmarks.worker SPEC.json OUT.json`.

A fresh process per configuration keeps peak RSS (ru_maxrss) and allocator state from leaking between
libraries. The result is a flat dict of raw numbers; `runner` aggregates across repeats.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.cases import CASES, LORA_DROPOUT, MIXED_ADAPTERS, Case, build_model, random_batches, select_cases
from benchmarks.libs import CONFIGS, BenchConfig, Ops, precision_context, resolve_precision, trainable_count

SAVE_LOAD_REPS = 3
#: Timed forwards per latency (after one untimed): the same-model "adapters off" rows of two processes differ
#: by more than more repetitions would remove, and three keep `make bench` within half an hour on 2 cores.
FORWARD_REPS = 3


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], warmup: int, reps: int, device: str) -> list[float]:
    """Seconds per call of `fn` over `reps` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def peak_memory_mb(device: str) -> dict[str, float]:
    """Peak RSS so far (Linux ru_maxrss is in KiB), peak CUDA memory on GPU, and the 1-minute load average."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "load_1min": os.getloadavg()[0]}
    if device.startswith("cuda"):
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def measure_training(setup: Any, batches: list[torch.Tensor], warmup: int, device: str) -> dict[str, Any]:
    """Step time and tokens/s over the timed steps (`batches` after the first `warmup`); the first warm-up
    step also counts the step's matmul FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    batches = [b.to(device) for b in batches]
    counter = FlopCounterMode(display=False)
    with counter:
        losses = [setup.step(batches[0])]
    losses += [setup.step(b) for b in batches[1:warmup]]
    _sync(device)
    times = []
    for batch in batches[warmup:]:
        start = time.perf_counter()
        losses.append(setup.step(batch))
        _sync(device)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return {"step_s": step_s, "step_times": times, "tokens_per_s": batches[0].numel() / step_s,
            "first_loss": losses[0], "last_loss": losses[-1], "step_gflop": counter.get_total_flops() / 1e9,
            "gflops_per_s": counter.get_total_flops() / 1e9 / step_s}


def ceiling_share(result: dict[str, Any], ceilings: dict[str, float], precision: str) -> dict[str, float]:
    """Achieved matmul GFLOP/s as a fraction of the measured GEMM ceiling at the precision that ran."""
    if "gflops_per_s" not in result or not ceilings.get(precision):
        return {}
    return {"ceiling_share": result["gflops_per_s"] / ceilings[precision]}


def measure_inference(model: Any, ops: Ops, cfg: BenchConfig, ids: torch.Tensor, reps: int) -> dict[str, float]:
    """Forward latency with adapters disabled, unmerged and merged; merge and unmerge time.

    The three forwards are interleaved, one of each per round (after one untimed round), so drift of a
    noisy machine hits them alike: they are compared with each other (unmerged and merged against base).
    """
    model.eval()

    def forward() -> None:
        with torch.no_grad(), precision_context(cfg):
            model(input_ids=ids)

    def base_forward() -> None:
        with ops.disabled(model):
            forward()

    times: dict[str, list[float]] = defaultdict(list)
    for round_index in range(reps + 1):
        rounds = {"fwd_base_s": timed(base_forward, 0, 1, cfg.device),
                  "fwd_unmerged_s": timed(forward, 0, 1, cfg.device),
                  "merge_s": timed(lambda: ops.merge(model), 0, 1, cfg.device),
                  "fwd_merged_s": timed(forward, 0, 1, cfg.device),
                  "unmerge_s": timed(lambda: ops.unmerge(model), 0, 1, cfg.device)}
        if round_index:  # the first round warms up
            for key, value in rounds.items():
                times[key] += value
    return {key: statistics.median(values) for key, values in times.items()}


def measure_save_load(model: Any, ops: Ops, device: str) -> dict[str, float]:
    """Median time to save the trained adapter, and to load it back as a new adapter (then removed)."""
    save_times, load_times = [], []
    with tempfile.TemporaryDirectory(prefix="loratune-bench-") as tmp:
        for i in range(SAVE_LOAD_REPS):
            directory = Path(tmp) / f"adapter{i}"
            save_times += timed(lambda d=directory: ops.save(model, d), 0, 1, device)
            load_times += timed(lambda d=directory, n=f"loaded{i}": ops.load(model, d, n), 0, 1, device)
            ops.delete(model, f"loaded{i}")
    return {"save_s": statistics.median(save_times), "load_s": statistics.median(load_times)}


def run_train_case(case: Case, spec: dict[str, Any], cfg: BenchConfig) -> dict[str, Any]:
    library = CONFIGS[spec["config"]]
    model = build_model(case.model, spec["quick"])
    setup = library.setup(model, cfg)
    ops = library.ops(cfg)
    batches = random_batches(model.config.vocab_size, spec["warmup"] + spec["steps"], case.batch, case.seq_len)
    result: dict[str, Any] = {"trainable_params": trainable_count(setup.model)}
    result.update(measure_training(setup, batches, spec["warmup"], cfg.device))
    result.update(ceiling_share(result, spec.get("ceilings", {}), cfg.precision))
    result.update(peak_memory_mb(cfg.device))
    ids = batches[0].to(cfg.device)
    result.update(measure_inference(setup.model, ops, cfg, ids, FORWARD_REPS))
    result.update(measure_save_load(setup.model, ops, cfg.device))
    return result


def run_mixed_case(case: Case, spec: dict[str, Any], cfg: BenchConfig) -> dict[str, Any]:
    """Throughput of one batch whose rows use `MIXED_ADAPTERS` different adapters, vs all rows on one."""
    library = CONFIGS[spec["config"]]
    model = build_model(case.model, spec["quick"])
    setup = library.setup(model, cfg)
    ops = library.ops(cfg)
    names = ["default"] + [f"a{i}" for i in range(1, MIXED_ADAPTERS)]
    for name in names[1:]:
        ops.add(setup.model, name)
    setup.model.eval()
    ids = random_batches(model.config.vocab_size, 1, case.batch, case.seq_len)[0].to(cfg.device)
    rows = [names[i % len(names)] for i in range(case.batch)]

    def run(fn: Callable[[], Any]) -> float:
        def call() -> None:
            with torch.no_grad(), precision_context(cfg):
                fn()
        return statistics.median(timed(call, 1, FORWARD_REPS, cfg.device))

    single_s = run(lambda: ops.forward_single(setup.model, "default", ids))
    mixed_s = run(lambda: ops.forward_mixed(setup.model, rows, ids))
    result = {"single_fwd_s": single_s, "mixed_fwd_s": mixed_s, "single_tokens_per_s": ids.numel() / single_s,
              "mixed_tokens_per_s": ids.numel() / mixed_s, "mixed_over_single": mixed_s / single_s,
              "trainable_params": trainable_count(setup.model)}
    result.update(peak_memory_mb(cfg.device))
    return result


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration; never raises (failures become a status and a reason)."""
    torch.set_num_threads(spec["threads"])
    case = select_cases([spec["case"]], spec["quick"], [spec["variant"]])[0]
    variant = next(v for v in CASES[spec["case"]].variants if v.name == spec["variant"])
    precision = resolve_precision(CONFIGS[spec["config"]].precision, spec["device"])
    cfg = BenchConfig(variant.r, variant.target_spec, LORA_DROPOUT, precision, spec["device"],
                      init_lora_weights=case.kind != "mixed")
    try:
        runner = run_mixed_case if case.kind == "mixed" else run_train_case
        return {"status": "ok", "precision": precision, **runner(case, spec, cfg)}
    except ImportError as exc:
        return {"status": "unavailable", "reason": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:  # noqa: BLE001 - any failure is reported, not raised
        unavailable = type(exc).__name__ == "ModelLoadError"
        traceback.print_exc()
        return {"status": "unavailable" if unavailable else "failed", "reason": f"{type(exc).__name__}: {exc}"}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    result = run_spec(spec)
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
