"""Where the demo's peak memory goes: resident and peak RSS after each phase of the demo's job, in one fresh
process (imports, model load, data, evaluation before, training steps, evaluation after).

    python -m benchmarks memory [--steps 20] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb() -> tuple[float, float]:
    """(resident now, peak so far) in MB."""
    now = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            now = int(line.split()[1]) / 1024
    return now, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks memory")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    rows = [("python + argparse", *_rss_mb(), 0.0)]
    started = time.perf_counter()

    def mark(phase: str) -> None:
        rows.append((phase, *_rss_mb(), time.perf_counter() - started))

    import torch  # noqa: F401

    mark("import torch")
    import transformers  # noqa: F401

    mark("import transformers")
    from loratune.train import demo_config
    from loratune.train.batches import BatchOrder
    from loratune.train.loop import finish, start_run, train_step
    from loratune.train.session import prepare

    mark("import loratune (data, datasets, train)")
    with tempfile.TemporaryDirectory() as tmp:
        config = demo_config(Path(tmp) / "run", [f"train.max_steps={args.steps}", *args.set])
        session = prepare(config, quiet=True)
        mark("prepare: model load + adapter + tokenized data")
        run = start_run(session, Path(tmp) / "run")
        mark("evaluation before training")
        session.model.train()
        order = BatchOrder(len(session.data.train_examples), config.train.batch_size, config.train.seed)
        progress = session.progress(total=args.steps)
        for step in range(args.steps):
            train_step(run, order, progress)
            if step == 0:
                mark("first training step (optimizer state made)")
        mark(f"{args.steps} training steps")
        finish(run)
        mark("evaluation after training + save")
    print("| phase | RSS now, MB | peak RSS so far, MB | seconds |\n|---|---|---|---|")
    for phase, now, peak, seconds in rows:
        print(f"| {phase} | {now:.0f} | {peak:.0f} | {seconds:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
