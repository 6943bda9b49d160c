"""The process's memory allocator: jemalloc where the system has it, and glibc kept from holding on to freed
memory otherwise, with the CPU's kernel caches bounded, so a run's RSS is its real size.

A training step allocates and frees a few hundred activation-sized blocks (0.5-4 MB); glibc's heap leaves
holes between the ones that stay, so the demo's peak sat 250 MB above what was live (14,000 free fragments
at the end of a forward pass). jemalloc's size classes do not fragment so: the whole demo's peak RSS measured
1468-1474 against 1730-1780 MiB, training time within the runs' spread (docs/benchmarks.md). A library cannot
change its process's allocator, so the `loratune` program does (`use_preferred_malloc`, from `cli.program`):
before a long command (`cli.LONG_COMMANDS`, and `inspect --memory`) it restarts itself once with the library
in `LD_PRELOAD` (a second start of the interpreter; `import loratune.cli` imports no torch). `LORATUNE_MALLOC` picks:
unset or `jemalloc` (use it where the system has it, e.g. Debian's `libjemalloc2`, unless the user preloads
libraries of their own), `system` (never restart), or the path of a malloc library to preload.

Under glibc, reading and quantizing a model, converting a GGUF file, evaluating free many blocks of a few
megabytes between tensors that stay; glibc keeps those pages resident unless told otherwise. Every run trims
after those phases (`release_free_memory`), not after each training step: the next step would fault the same
pages back in (measured on the demo: 8% more time per step, the same peak over 40 steps); quantized runs also
map large blocks (`return_large_blocks`).

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
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loratune.core.errors import ConfigError

MALLOC_VARIABLE = "LORATUNE_MALLOC"
_RESTARTED_VARIABLE = "LORATUNE_MALLOC_RESTARTED"  # set for the restarted process: the library it preloaded


def preferred_malloc(environ: Mapping[str, str] = os.environ) -> str | None:
    """The malloc library the `loratune` program should run under (an absolute path, or a soname the loader
    finds), or None to keep the process's own: jemalloc where the system has one, unless `LORATUNE_MALLOC`
    says otherwise, and nothing when the user preloads libraries of their own without naming one."""
    choice = environ.get(MALLOC_VARIABLE, "").strip()
    if choice == "system" or not sys.platform.startswith("linux"):
        return None
    if choice in ("", "jemalloc"):
        return None if environ.get("LD_PRELOAD", "").strip() else ctypes.util.find_library("jemalloc")
    path = Path(choice).resolve()
    if not path.is_file():
        raise ConfigError(f"{MALLOC_VARIABLE}={choice}: no such file (give a malloc library's path, "
                          "`jemalloc` or `system`)")
    if any(c in str(path) for c in " :\t"):
        raise ConfigError(f"{MALLOC_VARIABLE}={choice}: LD_PRELOAD cannot take a path with a space or a colon")
    return str(path)


def use_preferred_malloc(program: str) -> bool:
    """Restart this process (same PID and arguments) with `preferred_malloc()` appended to `LD_PRELOAD`, once:
    not when there is none, when the process has it already, or when it has restarted before (a loader that
    drops `LD_PRELOAD`, as for a setuid interpreter, would otherwise restart it forever). Returns only when it
    does not restart (its children inherit the preload): False after one line on stderr, prefixed `program`,
    when `LORATUNE_MALLOC` names no usable library."""
    if os.environ.get(_RESTARTED_VARIABLE) is not None:
        return True
    try:
        library = preferred_malloc()
    except ConfigError as exc:
        print(f"{program}: error: {exc}", file=sys.stderr)
        return False
    preloaded = os.environ.get("LD_PRELOAD", "").replace(":", " ").split()
    if library is None or Path(library).name in {Path(p).name for p in preloaded}:
        return True
    if _JEMALLOC is not None and "jemalloc" in Path(library).name:  # linked in, or preloaded under another name
        return True
    env = {**os.environ, "LD_PRELOAD": " ".join([*preloaded, library]), _RESTARTED_VARIABLE: library}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:  # carry on under the allocator the process has
        pass
    return True


def active_malloc() -> str:
    """The malloc this process allocates through, as runs and benchmarks record it: "jemalloc", the file name
    of the library `LORATUNE_MALLOC` named, or "system" (glibc's or the platform's)."""
    if _JEMALLOC is not None:
        return "jemalloc"
    restarted = os.environ.get(_RESTARTED_VARIABLE)
    return Path(restarted).name if restarted else "system"


def release_free_memory() -> None:
    """Hand freed heap pages back to the system: glibc's `malloc_trim`, or jemalloc's purge of every arena.

    Reading and quantizing leaves freed blocks of tens of megabytes between the small quantized tensors
    that stay; glibc keeps such pages resident, which measured 0.7 GB of a 1.1B model's 2.1 GB after loading.
    """
    if _JEMALLOC is not None:
        _purge_jemalloc(_JEMALLOC)
    elif _LIBC is not None:
        _LIBC.malloc_trim(0)


def _purge_jemalloc(process: Any) -> None:
    """Purge every jemalloc arena: index 4096 means all of them in jemalloc 5, index `arenas.narenas` in 3 and 4."""
    if process.mallctl(b"arena.4096.purge", None, None, None, 0) == 0:
        return
    count, size = ctypes.c_uint(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_uint))
    if process.mallctl(b"arenas.narenas", ctypes.byref(count), ctypes.byref(size), None, 0) == 0:
        process.mallctl(f"arena.{count.value}.purge".encode(), None, None, None, 0)


def return_large_blocks(threshold: int = 4 << 20) -> bool:
    """Ask glibc to serve allocations of `threshold` bytes and more from fresh mappings, which go back to
    the system when freed. Process-wide; left alone when the user set `MALLOC_MMAP_THRESHOLD_`.

    Training otherwise leaves freed activation blocks of a few megabytes resident between tensors that
    stay: measured on a 1.1B NF4 model (batch 1 x 512), peak RSS 3.0-3.8 GB by default and 2.0 GB with
    this, at about 15% more time per step (fresh pages cost page faults). Quantized mode is for when memory
    is what runs out, so `load_model(..., quantize=...)` turns it on. Returns whether it took effect.
    """
    if _LIBC is None or _JEMALLOC is not None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
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


def _jemalloc() -> Any:
    """The process's own symbols when they include jemalloc's `mallctl` (preloaded or linked), else None."""
    try:
        process = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(process, "mallctl"):
        return None
    process.mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    process.mallctl.restype = ctypes.c_int
    return process


_LIBC = _glibc()
_JEMALLOC = _jemalloc()
bound_kernel_caches()
