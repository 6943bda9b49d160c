"""Which precision a run computes in and which dtype its frozen weights take: decided once, for the
trainer, the memory estimate and the benchmarks alike.

On a CPU the choice is measured, not assumed: a short probe times the matrix products a training step is
made of (fp32, bf16, int8, and an int8-stored frozen layer both ways) and the fastest wins. The probe runs
once per CPU model and torch version; its rates are kept in `probe.json` in the loratune cache folder.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from loratune.core.atomic_write import write_text_atomic
from loratune.pretrained import DTYPE_NAMES, default_cache_dir, stored_dtype
from loratune.quant.linear import QuantLinear, set_base_compute
from loratune.quant.widen import NARROW_DTYPES

#: tokens x in x out of the probe's products: a small model's MLP at a short batch (1.5 GFLOP each)
PROBE_SHAPE = (256, 1024, 2816)
PROBE_VERSION = 4  # 2: measured on one thread, as measure_rates says; 3: layers timed forward and input gradient;
# 4: an int8 layer's codes path dequantizes with the compiled kernels where they build (quant.native)
#: How much faster than converting its codes an int8 x int8 layer must measure (on the probe's one thread) to be
#: chosen. Besides its product it makes about ten passes over the activations (quantizing inputs and output
#: gradients per token), which scale worse with threads than one product: at the probe's shape, forward and input
#: gradient, int8 over codes measured 1.37x and 0.83x on one thread and 0.31x and 0.22x on two (bf16), 2.3-2.7x
#: and 1.06-1.34x (fp32), on shared cores (docs/benchmarks.md).
INT8_MARGIN = 1.5


def resolve_precision(requested: str, device: torch.device) -> str:
    """bf16 autocast on CUDA with bf16 support, or on a CPU with native bf16 (AMX / AVX512-BF16) where the
    probe measured bf16 products faster than fp32 ones."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return cpu_choice()["precision"]


def base_dtype(requested: str, precision: str, stored: torch.dtype | None = None) -> torch.dtype:
    """The frozen weights' dtype. `auto`: bf16 when the matmuls run in bf16 anyway (autocast then has nothing
    to cast, and the weights take half the memory); in fp32, the checkpoint's own dtype `stored` when given
    and 16-bit (`train.memory.frozen_dtype` gives it only where fp32 weights would not fit; `pretrained.
    load_model` then widens each linear weight for its product, `quant.widen`), else fp32. Adapter weights
    stay fp32."""
    if requested == "auto":
        if precision == "bf16":
            return torch.bfloat16
        return stored if stored in NARROW_DTYPES else torch.float32
    return DTYPE_NAMES[requested]


def model_base_dtype(requested: str, precision: str, name_or_path: str) -> torch.dtype:
    """`base_dtype` for the model `name_or_path`, whose saved dtype is read (from its files' headers) only
    where `auto` depends on it."""
    needs_stored = requested == "auto" and precision != "bf16"
    return base_dtype(requested, precision, stored_dtype(name_or_path) if needs_stored else None)


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype of a run's products and activations: bf16 autocast computes in bf16, else fp32."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def inference_dtype(requested: str) -> torch.dtype:
    """The base model's dtype for `loratune generate` and `loratune serve` on the CPU: bf16 where `auto`
    resolves to bf16 (the probe measured native bf16 products faster), else fp32; or as `requested`
    ("bf16", "fp32"). Both commands take the same `--precision`, so their greedy tokens stay comparable."""
    return base_dtype("auto", resolve_precision(requested, torch.device("cpu")))


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_choice(precision: str | None = None) -> dict[str, str]:
    """{"precision": "bf16" or "fp32", "int8_base": "int8" or "dequantize"}: how this CPU computes best (the
    int8 choice at `precision` when a run fixed it)."""
    return choose(cpu_rates(), precision)


def choose(rates: dict[str, float], precision: str | None = None) -> dict[str, str]:
    """The fastest of the measured ways: bf16 only where its products beat fp32's; an int8-stored frozen
    layer multiplied in int8 (`quant.int8_compute`) only where that beats converting its codes by
    `INT8_MARGIN`, compared at `precision` (default: the faster one)."""
    if precision not in ("bf16", "fp32"):
        precision = "bf16" if rates.get("bf16", 0.0) > rates["fp32"] else "fp32"
    layer = rates.get(f"int8_layer_{precision}", 0.0)
    int8_base = "int8" if layer > INT8_MARGIN * rates.get(f"codes_layer_{precision}", 0.0) else "dequantize"
    return {"precision": precision, "int8_base": int8_base}


def cpu_rates(measure: Callable[[bool], dict[str, float]] | None = None) -> dict[str, float]:
    """GOP/s of each probed product on this CPU, from the cache or measured now (then cached)."""
    key = f"{cpu_model()} | torch {torch.__version__} | probe {PROBE_VERSION}"
    path = default_cache_dir() / "probe.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    if isinstance(cached.get(key), dict) and "fp32" in cached[key]:
        return cached[key]
    rates = (measure or measure_rates)(cpu_has_bf16())
    cached[key] = rates
    try:
        write_text_atomic(path, json.dumps(cached, indent=1, sort_keys=True) + "\n")
    except OSError:
        pass  # an unwritable cache costs a probe per process, nothing else
    return rates


def cpu_model() -> str:
    """The CPU's model name and a digest of its feature flags (a virtual machine's model name can be generic)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = fields.get("flags", "")
    return f"{name} (flags {hashlib.sha256(flags.encode()).hexdigest()[:8]})" if flags else name


def measure_rates(bf16: bool, shape: tuple[int, int, int] = PROBE_SHAPE, repeats: int = 5,
                  threads: int = 1, layers: bool = True) -> dict[str, float]:
    """Best GOP/s of `repeats` interleaved rounds (best, not median: on shared cores a product is slowed by
    others, never sped up; bf16 only where the CPU has it natively: emulated bf16
    never wins, and would only make the probe slow). An int8-stored layer is timed as training uses it, forward
    and input gradient (two products' operations), unless `layers` is False (the products alone)."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen) / k ** 0.5
    xi, wi = x.mul(40).round().clamp(-127, 127).to(torch.int8), w.t().mul(127).round().to(torch.int8).contiguous()
    layer = QuantLinear.from_weight(w, None, "int8")
    cases = {"fp32": lambda: x @ w.t(), "int8": lambda: torch._int_mm(xi, wi)}
    precisions = {"fp32": x}
    if bf16:
        xb, wb = x.bfloat16(), w.bfloat16()
        cases["bf16"] = lambda: xb @ wb.t()
        precisions["bf16"] = xb
    for name, xp in precisions.items() if layers else ():
        cases[f"codes_layer_{name}"] = _layer_case(layer, xp, "dequantize")
        cases[f"int8_layer_{name}"] = _layer_case(layer, xp, "int8")
    times: dict[str, list[float]] = {name: [] for name in cases}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # default 1: the ratios are a core's; one thread is not stalled by a busy sibling
    try:
        _time_cases(cases, times, repeats)
    finally:
        torch.set_num_threads(previous)
    ops = {name: (4 if "_layer_" in name else 2) * m * k * n for name in cases}
    return {name: round(ops[name] / min(t) / 1e9, 3) for name, t in times.items()}


def _time_cases(cases: dict[str, Callable[[], torch.Tensor]], times: dict[str, list[float]], repeats: int) -> None:
    with torch.inference_mode():
        for f in cases.values():
            f()  # warm-up: kernels chosen, buffers made
        for _ in range(repeats):
            for name, f in cases.items():
                start = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - start)


def _layer_case(layer: QuantLinear, x: torch.Tensor, compute: str) -> Callable[[], torch.Tensor]:
    """Forward and input gradient of the frozen layer: what a training step costs it."""
    upstream = torch.full((x.shape[0], layer.out_features), 1e-3, dtype=x.dtype)

    def run() -> torch.Tensor:
        set_base_compute(layer, compute)
        with torch.inference_mode(False), torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(layer(xg), xg, upstream)
        return grad
    return run
