"""The dequantization kernels (`dequant.cpp`), compiled for this machine's CPU on first use.

Why kernels: torch's NF4 dequantization takes three passes over the weight (widen the codes to indices,
gather from the code table, multiply by the block scales); on the 2-core AVX-512 machine a 2048 x 5632 weight
took 6.4 ms at 2 threads, about as long as the bf16 product of 512 tokens it feeds, and a training step
dequantizes every weight twice. The NF4 kernel does it in one pass (with AVX-512, a block's 16 scaled values
in one register and one permute per 32 outputs): 0.6 ms. The int8 kernel writes codes times row scales in
one pass, so the product needs no scaling of its output afterwards. torch has no such kernels for the CPU;
its fused weight-only int4 and int8 products measured 6-8x slower than AMX bf16 products at 512 tokens.

It is built with `torch.utils.cpp_extension` (a C++ compiler and ninja) into torch's extensions folder
(`TORCH_EXTENSIONS_DIR`), about 25 s once; the name carries a digest of the source, torch's version and the
CPU's flags, so machines of different CPUs sharing a home folder each build their own. Where it cannot be
built, or `LORATUNE_NATIVE=0`, dequantization takes torch's path, whose values differ by at most one bf16
rounding (the kernel rounds once, from fp32).
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("dequant.cpp")
DTYPES = (torch.bfloat16, torch.float32)
_LOCK = threading.Lock()
_BUILT: dict[str, ModuleType | None] = {}


def cpu_flags() -> str:
    """The CPU's feature flags (Linux), which `-march=native` compiles for; empty where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def kernels_for(device: torch.device, dtype: torch.dtype) -> ModuleType | None:
    """The kernels where they apply (CPU tensors, bf16 or fp32 output) and could be built, else None."""
    return dequant_kernels() if device.type == "cpu" and dtype in DTYPES else None


def dequant_kernels(scalar: bool = False) -> ModuleType | None:
    """The compiled kernel module, built on the first call (None where building failed or is turned off).

    `scalar` builds the portable loop without AVX-512, for tests on machines that have it."""
    if os.environ.get("LORATUNE_NATIVE", "1") == "0":
        return None
    variant = "scalar" if scalar else "native"
    if variant in _BUILT:  # every dequantization asks: no lock once the build is settled
        return _BUILT[variant]
    with _LOCK:
        if variant not in _BUILT:
            _BUILT[variant] = _build(scalar)
        return _BUILT[variant]


def _build(scalar: bool) -> ModuleType | None:
    flags = ["-O3", "-march=native", "-fopenmp"] + (["-DLORATUNE_SCALAR"] if scalar else [])
    try:
        from torch.utils import cpp_extension  # imports setuptools, which may be missing

        source = SOURCE.read_text()
        parts = [source, str(SOURCE), sys.prefix, torch.__version__, cpu_flags(), str(scalar)]
        digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()
        name = f"loratune_dequant_{digest[:16]}"
        folder = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / name
        folder.mkdir(parents=True, exist_ok=True)
        _clear_stale_lock(folder / "lock")
        return cpp_extension.load(name, [str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                  build_directory=str(folder), verbose=False)
    except Exception as exc:  # no compiler, no ninja, an unsupported flag, a read-only folder: torch's path works
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(f"loratune: the dequantization kernels could not be built ({reason[:200]}); quantized "
                      "layers use torch's slower dequantization", stacklevel=4)
        return None


def _clear_stale_lock(lock: Path, older_than_s: float = 600) -> None:
    """torch's build waits without end for the lock file another build holds; a build killed midway leaves it
    behind, so one older than any build takes (about 25 s here) is removed."""
    try:
        if time.time() - lock.stat().st_mtime > older_than_s:
            lock.unlink()
    except FileNotFoundError:
        pass
