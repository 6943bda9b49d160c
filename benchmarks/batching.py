"""Forward + backward time of the demo's batches built padded, packed and with a shared prefix, interleaved in
one process on the same model and the same batches (so load from other work hits all alike). The CPU seconds of
the process's threads are reported beside the wall seconds: they move less than wall time when other work
shares the cores.

    python -m benchmarks batching [--batches 8 --rounds 3] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

MODES = ("padded", "packed", "shared_prefix")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks batching")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    from loratune.batching import BatchMaker, BatchOrder
    from loratune.train import demo_config
    from loratune.train.session import prepare
    from loratune.train.step import batch_loss

    with tempfile.TemporaryDirectory() as tmp:
        config = demo_config(Path(tmp) / "run", args.set)
        session = prepare(config, quiet=True)
    model, examples = session.model, session.data.train_examples
    model.train()
    order = BatchOrder(len(examples), config.train.batch_size, config.train.seed)
    groups = [[examples[i] for i in order.batch(k)] for k in range(args.batches)]
    makers = {mode: BatchMaker(mode, "causal-lm", session.tokenizer.pad_token_id) for mode in MODES}
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu_seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    shape: dict[str, tuple[int, int, int]] = {}
    for _ in range(args.rounds):
        for mode, maker in makers.items():
            started, cpu_started, slots, real, prefix_tokens = time.perf_counter(), time.process_time(), 0, 0, 0
            for group in groups:
                batch, prefix = maker.make(group, session.device)
                with session.autocast():
                    loss, _, _ = batch_loss(model, batch, "causal-lm", session.loss_chunk, prefix)
                loss.backward()
                model.zero_grad(set_to_none=True)
                slots += batch["input_ids"].numel()
                real += int(batch["attention_mask"].sum())
                prefix_tokens += prefix * (batch["input_ids"].shape[0] - 1)
            seconds[mode].append(time.perf_counter() - started)
            cpu_seconds[mode].append(time.process_time() - cpu_started)
            shape[mode] = (slots, real, prefix_tokens)
    print(f"{args.batches} demo batches of {config.train.batch_size}, {args.rounds} interleaved rounds, torch threads "
          f"{__import__('torch').get_num_threads()}, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| batching | token slots | real tokens | prefix tokens not recomputed | median s | range s | vs padded "
          "| median CPU s | CPU vs padded |")
    print("|---|---|---|---|---|---|---|---|---|")
    base, cpu_base = statistics.median(seconds["padded"]), statistics.median(cpu_seconds["padded"])
    for mode in MODES:
        median, cpu_median = statistics.median(seconds[mode]), statistics.median(cpu_seconds[mode])
        slots, real, saved = shape[mode]
        print(f"| {mode} | {slots} | {real} | {saved} | {median:.2f} | {min(seconds[mode]):.2f}-"
              f"{max(seconds[mode]):.2f} | {base / median:.2f}x | {cpu_median:.2f} | {cpu_base / cpu_median:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
