"""`python -m benchmarks [run|race|serve] [options]`; `make soak` and `make check-runtimes` run
`benchmarks.soak`, `benchmarks.serve_abuse` and `benchmarks.runtimes` as modules of their own."""

from __future__ import annotations

import argparse
import sys

import torch


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.speed import CASES

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="loratune against PEFT, layer for layer ('run', the default), the demo's whole job against "
                    "TRL + PEFT ('race', see python -m benchmarks race --help), many adapters behind `loratune "
                    "serve` ('serve', see python -m benchmarks serve --help). Also: python -m benchmarks.soak, "
                    "benchmarks.serve_abuse (make soak) and benchmarks.runtimes (make check-runtimes).")
    parser.add_argument("command", nargs="?", default="run", choices=["run", "race", "serve"])
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="run only this case (repeatable)")
    variants = sorted({v for c in CASES.values() for v in c.variants})
    parser.add_argument("--variant", action="append", choices=variants, help="only this LoRA variant (repeatable)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process (default 5)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps per process (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="alternated rounds of all configurations (default 3)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's; "
                        "1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round: a smoke test of about a minute")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the results block of the docs")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["race"]:
        from benchmarks.race import main as race_main

        return race_main(argv[1:])
    if argv[:1] == ["scale"]:  # its own options: python -m benchmarks scale --help
        from benchmarks.scale import main as scale_main

        return scale_main(argv[1:])
    if argv[:1] == ["serve"]:
        from benchmarks.serve import main as serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device available", file=sys.stderr)
        return 2
    if args.quick:
        args.repeats, args.threads = 1, args.threads or 1
    args.threads = args.threads or torch.get_num_threads()
    from benchmarks.speed import run

    return run(args)


def program() -> int:
    """`python -m benchmarks`: under the malloc the `loratune` program takes (`allocator`), which the
    competitors' child processes inherit, then `main`."""
    from loratune.allocator import use_preferred_malloc

    return main() if use_preferred_malloc("python -m benchmarks") else 2


if __name__ == "__main__":
    sys.exit(program())
