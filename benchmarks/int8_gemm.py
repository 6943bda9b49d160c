"""GEMM throughput of the frozen base's product in int8 (`torch._int_mm`), bf16 and fp32, interleaved in one
process so that load from other work hits all three alike; medians and ranges over the rounds.

    python -m benchmarks int8-gemm [--m 1024 --k 1024 --n 2816 --rounds 7]

Also times the whole int8 layer (`Int8Linear`: per-token quantization of the input, product, scaling)
against the bf16 and fp32 `F.linear`, forward and input gradient, the cost a training step sees.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from loratune.quant.int8_compute import Int8Linear
from loratune.quant.storage import quantize


def _seconds(fn, repeat: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks int8-gemm")
    parser.add_argument("--m", type=int, default=1024)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--n", type=int, default=2816)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    m, k, n = args.m, args.k, args.n
    torch.manual_seed(0)
    x32, w32 = torch.randn(m, k), torch.randn(n, k) / 32
    x16, w16 = x32.bfloat16(), w32.bfloat16()
    xq, wq_t = torch.randint(-127, 128, (m, k), dtype=torch.int8), torch.randint(-127, 128, (k, n), dtype=torch.int8)
    q = quantize(w32, "int8")
    xg = x16.clone().requires_grad_()
    xf = x16.clone().requires_grad_()
    grad = torch.randn(m, n).bfloat16()
    cases = {
        "GEMM int8 (_int_mm), GOP/s": lambda: torch._int_mm(xq, wq_t),
        "GEMM bf16, GFLOP/s": lambda: x16 @ w16.t(),
        "GEMM fp32, GFLOP/s": lambda: x32 @ w32.t(),
        "layer int8 fwd+input grad, GFLOP/s": lambda: torch.autograd.grad(Int8Linear.apply(xg, q.data, q.scales),
                                                                          xg, grad),
        "layer bf16 fwd+input grad, GFLOP/s": lambda: torch.autograd.grad(F.linear(xf, w16), xf, grad),
    }
    flops = {name: 2 * m * k * n * (2 if name.startswith("layer") else 1) for name in cases}
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            samples[name].append(flops[name] / _seconds(fn, args.repeat) / 1e9)
    print(f"m={m} k={k} n={n}, torch threads {torch.get_num_threads()}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}, {args.rounds} interleaved rounds")
    print("| product | median | range |\n|---|---|---|")
    for name, values in samples.items():
        print(f"| {name} | {statistics.median(values):.0f} | {min(values):.0f}-{max(values):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
