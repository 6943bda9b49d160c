"""Command line: `python -m benchmarks [run|quality|docs] [options]` (see --help)."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.cases import CASES, select_cases


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="loratune vs PEFT: speed and memory (default command 'run'), quality parity ('quality'), "
                    "rebuild the results section of docs/benchmarks.md from benchmarks/results/latest.json "
                    "('docs'), compare the default path's loss curve with fp32 ('loss-curve'), or measure "
                    "quantized bases ('qlora', see python -m benchmarks qlora --help).")
    parser.add_argument("command", nargs="?", default="run", choices=["run", "quality", "docs", "loss-curve"])
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="run only this case (repeatable)")
    variants = sorted({v.name for c in CASES.values() for v in c.variants})
    parser.add_argument("--variant", action="append", choices=variants, help="run only this LoRA variant (repeatable)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process (at least 5; default 5)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps per process (at least 3; default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="alternated rounds of all configurations (default 3)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: torch's default; 1 with --quick, which is less "
                             "disturbed by other work on the machine)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round: a smoke test of about a minute")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the results section of the docs")
    parser.add_argument("--epochs", type=int, default=3, help="quality: training epochs (default 3)")
    return parser


def resolve_threads(args: argparse.Namespace) -> int:
    if args.threads is not None:
        return args.threads
    return 1 if args.quick else torch.get_num_threads()


def run_speed(args: argparse.Namespace) -> int:
    from benchmarks.report import markdown, write_all
    from benchmarks.runner import RunOptions, measure_ceilings, run_suite

    if args.steps < 5 or args.warmup < 3:
        print("--steps must be >= 5 and --warmup >= 3", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device available", file=sys.stderr)
        return 2
    repeats = 1 if args.quick and args.repeats == 3 else args.repeats
    threads = resolve_threads(args)
    ceilings = measure_ceilings(args.device, threads)
    print("GEMM ceiling (GFLOP/s): " + ", ".join(f"{k} {v:,.1f}" for k, v in ceilings.items()), file=sys.stderr)
    options = RunOptions(args.steps, args.warmup, repeats, args.device, threads, args.quick, ceilings)
    results = run_suite(select_cases(args.case, args.quick, args.variant), options)
    paths = write_all(results, update_docs=not args.no_docs)
    print(markdown(results))
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0 if all(r["status"] != "failed" for r in results["rows"]) else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["qlora"]:  # its own options: python -m benchmarks qlora --help
        from benchmarks.qlora import main as qlora_main

        return qlora_main(argv[1:])
    if argv[:1] == ["quality-lr"]:  # its own options: python -m benchmarks quality-lr --help
        from benchmarks.quality_lr import main as quality_lr_main

        return quality_lr_main(argv[1:])
    if argv[:1] == ["scale"]:  # its own options: python -m benchmarks scale --help
        from benchmarks.scale import main as scale_main

        return scale_main(argv[1:])
    if argv[:1] == ["serve"]:  # its own options: python -m benchmarks serve --help
        from benchmarks.serve import main as serve_main

        return serve_main(argv[1:])
    own = (["race"], ["int8-gemm"], ["memory"], ["batching"], ["generation"])
    if argv[:1] in own:  # their own options: python -m benchmarks race -h
        from benchmarks.batching import main as batching_main
        from benchmarks.generation import main as generation_main
        from benchmarks.int8_gemm import main as gemm_main
        from benchmarks.memory_profile import main as memory_main
        from benchmarks.race import main as race_main

        commands = {"race": race_main, "int8-gemm": gemm_main, "memory": memory_main, "batching": batching_main,
                    "generation": generation_main}
        return commands[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    if args.command == "docs":
        from benchmarks.report import regenerate_docs

        print(f"wrote {regenerate_docs()}")
        return 0
    if args.command == "loss-curve":
        from benchmarks.loss_curve import run_loss_curve

        return run_loss_curve()
    if args.command == "quality":
        from benchmarks.quality import run_quality

        code = run_quality(epochs=args.epochs, quick=args.quick, threads=resolve_threads(args))
    else:
        code = run_speed(args)
    print(f"total wall time {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
