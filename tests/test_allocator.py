"""The process's allocator: the `loratune` program restarting itself under a preferred malloc (jemalloc where
the system has one, `LORATUNE_MALLOC` otherwise), and bounded kernel caches: oneDNN's per-shape kernels (bf16
products) are capped before any model runs, unless the user set the capacities."""

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loratune import allocator
from loratune.allocator import (
    KERNEL_CACHE_CAPACITY,
    MALLOC_VARIABLE,
    active_malloc,
    preferred_malloc,
    release_free_memory,
)
from loratune.core.errors import ConfigError

RESTARTED = "LORATUNE_MALLOC_RESTARTED"

# Prints one line per start of the process, then the libraries it preloads.
RESTARTING = ("import os, sys; print('start', flush=True); from loratune.allocator import use_preferred_malloc; "
              "assert use_preferred_malloc('test'); print(os.environ.get('LD_PRELOAD', '-'))")


def _mapped_library(prefix: str) -> str:
    """A system library this process mapped (libc, libm): a real file that is harmless to preload."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if Path(path).name.startswith(prefix):
            return path
    raise AssertionError(f"no {prefix}* among this process's mappings")


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    """A Python child, with none of the settings these tests are about except those given."""
    ours = (MALLOC_VARIABLE, "LD_PRELOAD", RESTARTED, "ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
    clean = {k: v for k, v in os.environ.items() if k not in ours}
    return subprocess.run([sys.executable, *args], env={**clean, "PYTHONPATH": os.pathsep.join(sys.path), **env},
                          capture_output=True, text=True, timeout=300)


def test_the_preferred_malloc_is_jemalloc_where_found_else_what_the_variable_names(monkeypatch, tmp_path):
    found = []
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: found.append(name) or "libjemalloc.so.2")
    assert preferred_malloc({}) == "libjemalloc.so.2" and found == ["jemalloc"]
    assert preferred_malloc({MALLOC_VARIABLE: "jemalloc"}) == "libjemalloc.so.2"
    assert preferred_malloc({MALLOC_VARIABLE: "system"}) is None
    assert preferred_malloc({"LD_PRELOAD": "libasan.so.8"}) is None  # the user's own preloads come first
    library = tmp_path / "libtcmalloc.so"
    library.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert preferred_malloc({MALLOC_VARIABLE: "libtcmalloc.so"}) == str(library)  # absolute, for any child's cwd
    with pytest.raises(ConfigError, match=f"{MALLOC_VARIABLE}=.*missing.so: no such file"):
        preferred_malloc({MALLOC_VARIABLE: str(tmp_path / "missing.so")})
    (tmp_path / "my libs").mkdir()
    (tmp_path / "my libs" / "libx.so").write_bytes(b"")
    with pytest.raises(ConfigError, match="cannot take a path with a space"):
        preferred_malloc({MALLOC_VARIABLE: str(tmp_path / "my libs" / "libx.so")})
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert preferred_malloc({}) is None  # no jemalloc on this system: the process keeps its own


def test_the_process_restarts_once_with_the_library_appended_to_the_users_preloads():
    libc, libm = _mapped_library("libc.so"), _mapped_library("libm.so")
    done = _run(["-c", RESTARTING], **{MALLOC_VARIABLE: libc})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n") == ["start", "start", libc, ""]
    done = _run(["-c", RESTARTING], **{MALLOC_VARIABLE: libc, "LD_PRELOAD": libm})
    assert done.stdout.split("\n") == ["start", "start", f"{libm} {libc}", ""]
    done = _run(["-c", RESTARTING], **{MALLOC_VARIABLE: libc, "LD_PRELOAD": libc})  # there already: no restart
    assert done.stdout.split("\n") == ["start", libc, ""]
    done = _run(["-c", RESTARTING], **{MALLOC_VARIABLE: libc, RESTARTED: libc})  # the loader dropped it: no loop
    assert done.stdout.split("\n") == ["start", "-", ""]
    done = _run(["-c", RESTARTING], **{MALLOC_VARIABLE: "system"})
    assert done.stdout.split("\n") == ["start", "-", ""]


def test_long_commands_restart_and_a_missing_library_is_one_line_error(tmp_path):
    missing = str(tmp_path / "missing.so")
    done = _run(["-m", "loratune", "eval", str(tmp_path / "run.yaml")], **{MALLOC_VARIABLE: missing})
    assert done.returncode == 2
    assert done.stderr == f"loratune: error: {MALLOC_VARIABLE}={missing}: no such file (give a malloc library's " \
                          "path, `jemalloc` or `system`)\n"
    done = _run(["-m", "loratune", "inspect", "--adapter", str(tmp_path / "none")], **{MALLOC_VARIABLE: missing})
    assert done.returncode == 2 and MALLOC_VARIABLE not in done.stderr  # inspect starts once
    done = _run(["-m", "loratune", "inspect", "--memory", "--config", "run.yaml"], **{MALLOC_VARIABLE: missing})
    assert done.returncode == 2 and MALLOC_VARIABLE in done.stderr  # but estimates under train's malloc


class _FakeJemalloc:
    """jemalloc's `mallctl` as the allocator module calls it: records each name; `arena.4096` is unknown to
    jemalloc before 5.0, where the index of all arenas is `arenas.narenas` (here 8)."""

    def __init__(self, version: int) -> None:
        self.version, self.names = version, []

    def mallctl(self, name, old, old_size, new, new_size) -> int:
        self.names.append(name.decode())
        if name == b"arenas.narenas":
            ctypes.cast(old, ctypes.POINTER(ctypes.c_uint))[0] = 8
            return 0
        return 0 if self.version >= 5 or name != b"arena.4096.purge" else 2


def test_under_jemalloc_free_memory_is_purged_from_every_arena_and_the_run_says_jemalloc(monkeypatch):
    for version, names in ((5, ["arena.4096.purge"]), (4, ["arena.4096.purge", "arenas.narenas", "arena.8.purge"])):
        fake = _FakeJemalloc(version)
        monkeypatch.setattr(allocator, "_JEMALLOC", fake)
        release_free_memory()
        assert fake.names == names
        assert active_malloc() == "jemalloc"
    monkeypatch.setattr(allocator, "_JEMALLOC", None)
    monkeypatch.setenv(RESTARTED, "/opt/lib/libtcmalloc.so.4")
    assert active_malloc() == "libtcmalloc.so.4"
    monkeypatch.delenv(RESTARTED)
    assert active_malloc() == "system"


READ = ("import os, loratune.pretrained; "
        "print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], os.environ['LRU_CACHE_CAPACITY'])")


def _capacities(**env: str) -> list[str]:
    done = _run(["-c", READ], **env)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_loading_code_caps_both_kernel_caches_and_leaves_a_users_setting():
    assert _capacities() == [str(KERNEL_CACHE_CAPACITY)] * 2
    assert _capacities(LRU_CACHE_CAPACITY="1024") == [str(KERNEL_CACHE_CAPACITY), "1024"]
