"""Which precision a run computes in and which dtype its frozen weights take: decided once, for the
trainer, the memory estimate and the benchmarks alike."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_precision(requested: str, device: torch.device) -> str:
    """bf16 autocast on CUDA with bf16 support or on CPUs with native bf16 (AMX / AVX512-BF16)."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def base_dtype(requested: str, precision: str) -> torch.dtype:
    """Frozen weights in bf16 when the matmuls run in bf16 anyway: autocast then has nothing to cast, and
    the weights take half the memory. Adapter weights stay fp32 (they are created in fp32)."""
    if requested == "auto":
        return torch.bfloat16 if precision == "bf16" else torch.float32
    return DTYPES[requested]


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags
