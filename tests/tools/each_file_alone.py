"""Run every test file of the suite alone, each in its own pytest process (with pytest-randomly's shuffle on),
and list the files that fail: a test that passes only after another one ran shows up here.

    python tests/tools/each_file_alone.py [--jobs 1] [paths...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def run_alone(path: Path) -> tuple[Path, int, float, str]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "randomly", str(path)],
                          capture_output=True, text=True, cwd=TESTS.parent)
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    return path, done.returncode, time.monotonic() - started, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path)
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    files = [p.resolve() for p in args.paths] or sorted(p for p in TESTS.rglob("test_*.py") if "tools" not in p.parts)
    failed = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for path, code, seconds, summary in pool.map(run_alone, files):
            print(f"{'ok  ' if code == 0 else 'FAIL'} {path.relative_to(TESTS.parent)} ({seconds:.0f} s): {summary}",
                  flush=True)
            if code:
                failed.append(path)
    print(f"{len(files) - len(failed)} of {len(files)} test files pass alone")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
