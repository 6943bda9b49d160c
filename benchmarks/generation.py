"""Greedy generation of the demo's held-out answers with and without the shared prompt prefix, interleaved in
one process on the same model and prompts (so load from other work hits both alike).

    python -m benchmarks generation [--prompts 48 --new-tokens 6 --batch 32 --rounds 5] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks generation")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    import torch

    from loratune.batching import common_prefix_length
    from loratune.train import demo_config
    from loratune.train.evaluate import generate_texts
    from loratune.train.session import prepare

    with tempfile.TemporaryDirectory() as tmp:
        session = prepare(demo_config(Path(tmp) / "run", args.set), quiet=True)
    prompts = session.data.eval_prompts[:args.prompts]
    modes = {"left padding": False, "shared prefix": True}
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    answers: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        for mode, share in modes.items():
            started = time.perf_counter()
            answers[mode] = generate_texts(session.model, session.tokenizer, prompts, args.new_tokens, args.batch,
                                           session.device, session.autocast, share_prefix=share)
            seconds[mode].append(time.perf_counter() - started)
            print(f"{mode}: {seconds[mode][-1]:.2f} s", file=sys.stderr, flush=True)
    same = len({tuple(texts) for texts in answers.values()}) == 1
    chunks = [prompts[i:i + args.batch] for i in range(0, len(prompts), args.batch)]
    print(f"{len(prompts)} prompts ({sum(map(len, prompts))} tokens, common prefix per chunk "
          f"{[common_prefix_length(c) for c in chunks]}), {args.new_tokens} new tokens, batch {args.batch}, "
          f"{args.rounds} interleaved rounds, torch threads {torch.get_num_threads()}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; same answers: {same}")
    print("| generation | median s | range s | vs left padding |")
    print("|---|---|---|---|")
    base = statistics.median(seconds["left padding"])
    for mode, times in seconds.items():
        median = statistics.median(times)
        print(f"| {mode} | {median:.2f} | {min(times):.2f}-{max(times):.2f} | {base / median:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
