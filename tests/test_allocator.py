"""The process's allocator: the `loratune` program restarting itself under a preferred malloc (jemalloc where
the system has one, `LORATUNE_MALLOC` otherwise), and bounded kernel caches: oneDNN's per-shape kernels (bf16
products) are capped before any model runs, unless the user set the capacities."""

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loratune.allocator import KERNEL_CACHE_CAPACITY, MALLOC_VARIABLE, active_malloc, preferred_malloc
from loratune.core.errors import ConfigError

# Prints one line per start of the process, then the library it runs under.
RESTARTING = ("import os, sys; print('start', flush=True); from loratune.allocator import use_preferred_malloc; "
              "use_preferred_malloc(); print(os.environ.get('LD_PRELOAD', '-'))")


def _libc_path() -> str:
    """The C library this process mapped: a real file that is harmless to preload, present on any Linux."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if Path(path).name.startswith("libc.so") or Path(path).name.startswith("libc-"):
            return path
    raise AssertionError("no C library among this process's mappings")


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in (MALLOC_VARIABLE, "LD_PRELOAD")}
    return subprocess.run([sys.executable, *args], env={**clean, "PYTHONPATH": os.pathsep.join(sys.path), **env},
                          capture_output=True, text=True, timeout=300)


def test_the_preferred_malloc_is_jemalloc_where_found_else_what_the_variable_names(monkeypatch, tmp_path):
    found = []
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: found.append(name) or "libjemalloc.so.2")
    assert preferred_malloc({}) == "libjemalloc.so.2" and found == ["jemalloc"]
    assert preferred_malloc({MALLOC_VARIABLE: "jemalloc"}) == "libjemalloc.so.2"
    assert preferred_malloc({MALLOC_VARIABLE: "system"}) is None
    library = tmp_path / "libtcmalloc.so"
    library.write_bytes(b"")
    assert preferred_malloc({MALLOC_VARIABLE: str(library)}) == str(library)
    with pytest.raises(ConfigError, match=f"{MALLOC_VARIABLE}=.*missing.so: no such file"):
        preferred_malloc({MALLOC_VARIABLE: str(tmp_path / "missing.so")})
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert preferred_malloc({}) is None  # no jemalloc on this system: the process keeps its own


def test_the_process_restarts_once_with_the_library_preloaded_and_keeps_its_preloads():
    libc = _libc_path()
    done = _run(["-c", RESTARTING], **{MALLOC_VARIABLE: libc})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n") == ["start", "start", libc, ""]
    done = _run(["-c", RESTARTING], **{MALLOC_VARIABLE: libc, "LD_PRELOAD": libc})  # already there: no restart
    assert done.stdout.split("\n") == ["start", libc, ""]
    done = _run(["-c", RESTARTING], **{MALLOC_VARIABLE: "system"})
    assert done.stdout.split("\n") == ["start", "-", ""]


def test_model_commands_restart_and_a_missing_library_is_one_line_error(tmp_path):
    missing = str(tmp_path / "missing.so")
    done = _run(["-m", "loratune", "eval", str(tmp_path / "run.yaml")], **{MALLOC_VARIABLE: missing})
    assert done.returncode == 2
    assert done.stderr == f"loratune: error: {MALLOC_VARIABLE}={missing}: no such file (give a malloc library's " \
                          "path, `jemalloc` or `system`)\n"
    done = _run(["-m", "loratune", "inspect", "--adapter", str(tmp_path / "none")], **{MALLOC_VARIABLE: missing})
    assert done.returncode == 2 and MALLOC_VARIABLE not in done.stderr  # inspect loads no model: no restart


def test_this_process_reports_the_malloc_it_allocates_through():
    expected = "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "system"
    assert active_malloc() == expected

READ = ("import os, loratune.pretrained; "
        "print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], os.environ['LRU_CACHE_CAPACITY'])")


def _capacities(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    done = subprocess.run([sys.executable, "-c", READ], env={**clean, **env}, capture_output=True, text=True,
                          timeout=300, check=True)
    return done.stdout.split()


def test_loading_code_caps_both_kernel_caches_and_leaves_a_users_setting():
    assert _capacities() == [str(KERNEL_CACHE_CAPACITY)] * 2
    assert _capacities(LRU_CACHE_CAPACITY="1024") == [str(KERNEL_CACHE_CAPACITY), "1024"]
