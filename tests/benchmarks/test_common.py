"""The benchmarks' shared helpers: a child's own peak memory, the docs' generated blocks, no import circle."""

from __future__ import annotations

import ast
import mmap
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.common import peak_rss_mb, proc_status, replace_block, run_child

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_a_child_reports_its_own_peak_memory_not_the_parents():
    ballast = bytearray(300 * 2**20)  # the parent is big; the child must not inherit that in its count
    small = run_child([sys.executable, "-c", "print('small')"])
    touch = "b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('big')"
    big = run_child([sys.executable, "-c", touch])
    assert (small.code, big.code) == (0, 0)
    assert "small" in small.output and "big" in big.output
    assert small.peak_rss_mb < 150
    assert big.peak_rss_mb - small.peak_rss_mb > 180
    assert big.cpu_s >= 0 and big.wall_s > 0
    del ballast


def test_this_process_reads_its_resident_and_peak_memory():
    before = proc_status("VmRSS")
    # a fresh anonymous mapping: new pages whatever the allocator kept resident from earlier tests
    ballast = mmap.mmap(-1, 100 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touched, so resident
    assert proc_status("VmRSS") - before > 90 * 2**20
    assert peak_rss_mb() * 2**20 >= proc_status("VmRSS")
    assert proc_status("NoSuchField") is None
    ballast.close()


def test_another_process_is_read_by_its_pid_until_it_exits():
    code = "b = bytearray(64 * 2**20); b[::4096] = b'x' * len(b[::4096]); input()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while (proc_status("VmHWM", child.pid) or 0) < 64 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc_status("VmHWM", child.pid) >= 64 * 2**20
    finally:
        child.communicate(b"\n", timeout=30)
    assert proc_status("VmRSS", child.pid) is None


def test_a_failing_child_gives_its_exit_code_and_output():
    child = run_child([sys.executable, "-c", "import sys; print('why'); sys.exit(3)"])
    assert child.code == 3 and "why" in child.output


def test_replace_block_rewrites_only_between_its_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("before\n<!-- BEGIN X -->\nold\n<!-- END X -->\nafter\n")
    replace_block(page, "X", "new\nlines\n")
    assert page.read_text() == "before\n<!-- BEGIN X -->\nnew\nlines\n<!-- END X -->\nafter\n"
    with pytest.raises(SystemExit, match="BEGIN Y"):
        replace_block(page, "Y", "text")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("benchmarks."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("benchmarks.")}
    return found


def test_benchmarks_have_no_import_circle():
    graph = {p.stem: _imports(p) for p in BENCHMARKS.glob("*.py")}
    assert graph["common"] == set()  # what every benchmark shares imports none of them

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(n == target or (n not in seen and reaches(n, target, seen | {n})) for n in graph.get(start, ()))

    assert [m for m in graph if reaches(m, m, set())] == []
