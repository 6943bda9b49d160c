"""What every benchmark shares: a child process with its own peak memory, the machine's description, one
writer for results and the docs' generated blocks, and one way to start `loratune serve`.

Nothing here imports loratune: the benchmarks drive the package through its CLI and public functions.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratune.allocator import MALLOC_VARIABLE, active_malloc

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child: this interpreter's import path (the worktree's `src` first), offline, and
    this process's malloc."""
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT), *sys.path])
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    if active_malloc() == "system":  # a `loratune` child runs under the malloc this process records
        env.setdefault(MALLOC_VARIABLE, "system")
    return env


@dataclass
class ChildRun:
    """A finished child process: exit code, wall and CPU seconds, its own peak RSS, and what it printed."""

    code: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    output: str


# Runs ARGV and writes its exit code, CPU seconds and peak RSS. A child's ru_maxrss starts at the size of the
# process that forked it, so this small wrapper (about 10 MB), not the benchmark parent, does the forking.
_WRAPPER = """import json, os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as out:
    json.dump([os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024], out)
"""


def run_child(argv: list[str], timeout: float = 7200, **env: str) -> ChildRun:
    """Run `argv` in a fresh process and measure it alone: wall and CPU seconds and its own peak RSS (the
    kernel's count for that process). Output goes to a file, not a pipe that could fill."""
    with tempfile.TemporaryDirectory(prefix="bench-child-") as tmp:
        log, result = Path(tmp) / "output", Path(tmp) / "result.json"
        started = time.perf_counter()
        with log.open("w") as out:
            wrapper = subprocess.Popen([sys.executable, "-c", _WRAPPER, str(result), *argv], cwd=ROOT,
                                       env=child_env(**env), stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                wrapper.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(wrapper.pid, 9)
                wrapper.wait()
        wall = time.perf_counter() - started
        code, cpu, peak = json.loads(result.read_text()) if result.is_file() else (-9, 0.0, 0.0)
        return ChildRun(code, wall, cpu, peak, log.read_text(errors="replace"))


def proc_status(field: str, pid: int | str = "self") -> int | None:
    """Bytes of a memory field of /proc/PID/status (VmRSS: resident now, VmHWM: peak since start), or None
    where there is no such file (not Linux, or the process is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM; elsewhere the kernel's ru_maxrss)."""
    peak = proc_status("VmHWM")
    if peak is not None:
        return peak / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict[str, Any]:
    """Date, command, versions, CPU model, count and flags, load average: recorded with every result."""
    info: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                            "command": " ".join(["python -m", _module(), *sys.argv[1:]]),
                            "python": platform.python_version(), "cpu_count": os.cpu_count(),
                            "load_average": [round(x, 2) for x in os.getloadavg()]}
    for package in ("torch", "transformers", "peft", "trl"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            pass
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        lines = []
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    info["cpu"] = fields.get("Model name", platform.processor() or "unknown")
    info["cpu_flags"] = fields.get("Flags", "unknown")
    info["malloc"] = active_malloc()
    return info


def _module() -> str:
    """`benchmarks` or `benchmarks.NAME`: the module this process was started as."""
    name = Path(sys.argv[0]).stem
    return "benchmarks" if name in ("__main__", "") else f"benchmarks.{name}"


def write_result(stem: str, result: dict[str, Any], table: str, docs_block: str | None = None) -> list[Path]:
    """`results/STEM.json` and `.md` (the table under the command, date and CPU), and, when given, the
    docs block `<!-- BEGIN docs_block -->` ... `<!-- END docs_block -->` of docs/benchmarks.md."""
    meta = result.get("machine", {})
    header = (f"`{meta.get('command', '')}`, {meta.get('date', '')}, {meta.get('cpu', '')}, "
              f"{meta.get('malloc', 'system')} malloc\n\n")
    RESULTS.mkdir(exist_ok=True)
    paths = [RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(header + table)
    if docs_block:
        replace_block(DOCS, docs_block, header + table)
        paths.append(DOCS)
    return paths


def replace_block(path: Path, name: str, text: str) -> None:
    """Put `text` between the page's `<!-- BEGIN name -->` and `<!-- END name -->` lines."""
    page = path.read_text()
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    if begin not in page or end not in page:
        raise SystemExit(f"{path}: no {begin} ... {end} block to rewrite")
    head, rest = page.split(begin, 1)
    path.write_text(f"{head}{begin}\n{text.rstrip()}\n{end}{rest.split(end, 1)[1]}")


def start_server(argv: list[str], timeout: float = 300, headers: dict | None = None,
                 log: Path | None = None, **env: str) -> tuple[subprocess.Popen, str]:
    """`loratune serve ARGV` on a free port of 127.0.0.1; returns the process and its URL once /health is 200."""
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "loratune", "serve", "--host", "127.0.0.1", "--port", str(port), *argv]
    out = log.open("w") if log else None
    process = subprocess.Popen(command, env=child_env(**env), stdout=out, stderr=subprocess.STDOUT if out else None)
    url = f"http://127.0.0.1:{port}"
    detail: Callable[[], str] = (lambda: f": {log.read_text()[-2000:]}") if log else (lambda: "")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with code {process.returncode} at start-up{detail()}")
        try:
            if httpx.get(url + "/health", headers=headers, timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(process)
    raise SystemExit(f"the server did not answer /health within {timeout:.0f} s{detail()}")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if the server has not exited within 30 s."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
