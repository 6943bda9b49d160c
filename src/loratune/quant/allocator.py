"""Keep the C allocator from holding on to freed memory, and the CPU's kernel caches bounded, so a run's RSS
is its real size.

glibc only; elsewhere these functions do nothing. Reading and quantizing a model, converting a GGUF file,
evaluating free many blocks of a few megabytes between tensors that stay; glibc keeps those pages resident
unless told otherwise. Every run trims after those phases (`release_free_memory`), not after each training
step: the next step would fault the same pages back in (measured on the demo: 8% more time per step, the same
peak over 40 steps); quantized runs also map large blocks (`return_large_blocks`).

bf16 products on a CPU with AMX or AVX512-BF16 run through oneDNN, which compiles kernels for each shape and
keeps them: 1024 in its own cache and 1024 in torch's wrapper (ideep) by default. Training batches of varying
token counts make new ones every step, about 0.6 MB each, so resident memory grew with the step count: the
demo's 100 steps peaked at 2.40 GB where 3 steps peaked at 1.37 GB. `bound_kernel_caches` caps both caches
when this module is imported (`pretrained` imports it, before any model runs; the caches read their capacity
at their first use).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any


def release_free_memory() -> None:
    """Hand freed heap pages back to the system (glibc's `malloc_trim`; elsewhere nothing happens).

    Reading and quantizing leaves freed blocks of tens of megabytes between the small quantized tensors
    that stay; glibc keeps such pages resident, which measured 0.7 GB of a 1.1B model's 2.1 GB after loading.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def return_large_blocks(threshold: int = 4 << 20) -> bool:
    """Ask glibc to serve allocations of `threshold` bytes and more from fresh mappings, which go back to
    the system when freed. Process-wide; left alone when the user set `MALLOC_MMAP_THRESHOLD_`.

    Training otherwise leaves freed activation blocks of a few megabytes resident between tensors that
    stay: measured on a 1.1B NF4 model (batch 1 x 512), peak RSS 3.0-3.8 GB by default and 2.0 GB with
    this, at about 15% more time per step (fresh pages cost page faults). Quantized mode is for when memory
    is what runs out, so `load_model(..., quantize=...)` turns it on. Returns whether it took effect.
    """
    if _LIBC is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, threshold))


_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h

#: Kernels each cache keeps: a training step of the demo uses 56 (oneDNN's log), so a few steps' worth stay
#: cached and a token count seen again within them compiles nothing.
KERNEL_CACHE_CAPACITY = 64
_KERNEL_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN's, torch's ideep's


def bound_kernel_caches(capacity: int = KERNEL_CACHE_CAPACITY) -> None:
    """Cap oneDNN's per-shape kernel caches at `capacity` entries, unless the user set the variables. Effective
    only before the process's first oneDNN product (each cache reads its capacity once)."""
    for name in _KERNEL_CACHES:
        os.environ.setdefault(name, str(capacity))


def _glibc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()
bound_kernel_caches()
