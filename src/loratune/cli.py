"""The `loratune` command: parses arguments and calls the library functions, nothing more.

Any user error ends with exit code 2 and one line on stderr (a traceback only with --debug).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from loratune.core.errors import LoratuneError
from loratune.errors import ReportedByAnotherRank
from loratune.tasks import TASKS

DEMO_OUTPUT = "runs/demo"


def _train(args: argparse.Namespace) -> int | None:
    from loratune.data import check_sources
    from loratune.train import fit, load_config
    from loratune.train.distributed import join_checked, under_torchrun

    if args.nproc:
        return _launch_torchrun(args, under_torchrun())
    config, processes = join_checked(lambda: load_config(args.config, args.set),
                                     lambda config: check_sources(config.data, config.model.task))
    with processes:
        summary = fit(config, resume=args.resume, quiet=args.quiet, processes=processes)
    if processes.is_main:
        _print_summary(summary, Path(config.output_dir))
    return None


def _launch_torchrun(args: argparse.Namespace, already: bool) -> int:
    """`loratune train --nproc N`: the same command under torchrun, N processes on this machine."""
    import subprocess

    if already:
        raise LoratuneError("--nproc: already running under torchrun; leave --nproc out")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "loratune", *(["--debug"] if args.debug else []), "train", args.config,
               *[f"--set={assignment}" for assignment in args.set], *(["--resume"] if args.resume else []),
               *(["--quiet"] if args.quiet else [])]
    return subprocess.run(command, check=False).returncode


def _resume_command(args: argparse.Namespace) -> str:
    """The command that continues a stopped `loratune train` (or `demo`) run, as the user would type it."""
    if args.command == "demo":  # the demo's resolved config, written when its training starts
        words = ["loratune", "train", str(Path(args.output) / "config.yaml")]
    else:
        words = ["loratune", "train", args.config]
        words += [part for assignment in args.set for part in ("--set", assignment)]
    return "`" + shlex.join([*words, "--resume"]) + "`"


def _print_summary(summary: dict, out: Path) -> None:
    before, after = summary["before"], summary["after"]
    print(f"trained {summary['steps']} steps in {summary['train_seconds']:.1f} s "
          f"({summary['tokens_per_second']:.0f} tokens/s, peak RSS {summary['peak_rss_mb']:.0f} MB, "
          f"gradient checkpointing {summary.get('gradient_checkpointing', 'off')})")
    for key in after:
        if isinstance(after[key], float):
            print(f"  {key}: {before.get(key, float('nan')):.4f} -> {after[key]:.4f}")
    print(f"adapter: {out / 'adapter'}\nreport:  {out / 'report.md'}\nplot:    {out / 'plot.png'}")


def _eval(args: argparse.Namespace) -> None:
    from loratune.train import evaluate_run, load_config

    config = load_config(args.config, args.set)
    metrics = evaluate_run(config, adapter=args.adapter, quiet=args.quiet)
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


def _generate(args: argparse.Namespace) -> None:
    from loratune.generate import generate_stream

    generate_stream(args.model, args.prompt, adapter=args.adapter, chat=args.chat,
                    max_new_tokens=args.max_new_tokens, out=sys.stdout, task=args.task)


def _merge(args: argparse.Namespace) -> None:
    from .export.merged_folder import write_merged_folder

    out = write_merged_folder(args.model, args.adapter, args.out, args.task)
    print(f"merged model written to {out}")


def _export(args: argparse.Namespace) -> None:
    from .export import export

    for path in export(args.adapter_dir, args.model, args.format, args.out, args.dtype):
        print(f"wrote {path}")


def _inspect(args: argparse.Namespace) -> None:
    from loratune.summary import inspect_command

    inspect_command(model_name=args.model, task=args.task, config_path=args.config, adapter=args.adapter,
                    out=sys.stdout, memory=args.memory)


def _demo(args: argparse.Namespace) -> None:
    from loratune.train import demo_config, fit

    if args.output is None:  # `make demo` again: a new numbered folder, never over the earlier demo
        args.output = next_free_folder(Path(DEMO_OUTPUT))
        if args.output != DEMO_OUTPUT:
            print(f"loratune: {DEMO_OUTPUT} holds an earlier demo; writing to {args.output}", file=sys.stderr)
    config = demo_config(args.output, args.set)
    summary = fit(config, quiet=args.quiet)
    _print_summary(summary, Path(config.output_dir))


def next_free_folder(base: Path) -> str:
    """`base`, or `base-2`, `base-3`, ...: the first that does not exist or is an empty folder."""
    candidate, number = base, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        number += 1
        candidate = base.with_name(f"{base.name}-{number}")
    return str(candidate)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loratune", description="LoRA fine-tuning of language models")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("config", help="YAML run config")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config key, e.g. train.max_steps=50 (repeatable)")
        sub.add_argument("--quiet", action="store_const", const=True, default=None,
                         help="no progress bars (the default when stderr is not a terminal)")

    train = commands.add_parser("train", help="train a LoRA adapter from a YAML config")
    with_config(train)
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    train.add_argument("--nproc", type=_positive_int, metavar="N",
                       help="train with N processes on this machine (launches torchrun; see docs/distributed.md)")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="evaluate a model (and adapter) on a config's evaluation data")
    with_config(evaluate)
    evaluate.add_argument("--adapter", help="adapter folder (default: the config's output_dir/adapter)")
    evaluate.set_defaults(run=_eval)

    generate = commands.add_parser("generate", help="generate text, streaming tokens to the terminal")
    generate.add_argument("--model", required=True)
    generate.add_argument("--adapter")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt with the model's chat template")
    generate.add_argument("--task", choices=["causal-lm", "seq2seq"],
                          help="model kind (default: the adapter's task type, else causal-lm)")
    generate.add_argument("--max-new-tokens", type=_positive_int, default=64)
    generate.set_defaults(run=_generate)

    merge = commands.add_parser("merge", help="write a plain model folder with the adapter merged in")
    merge.add_argument("--model", required=True)
    merge.add_argument("--adapter", required=True)
    merge.add_argument("--out", required=True)
    merge.add_argument("--task", default="causal-lm", choices=TASKS)
    merge.set_defaults(run=_merge)

    export = commands.add_parser("export", help="write an adapter for llama.cpp / Ollama (GGUF) or a merged model")
    export.add_argument("adapter_dir")
    export.add_argument("--model", required=True, help="the base model: a folder, a .gguf file or a built-in name")
    export.add_argument("--format", required=True, choices=["gguf-lora", "gguf", "safetensors"])
    export.add_argument("--out", required=True, help="the .gguf file (or, for safetensors, the folder) to write")
    export.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0"],
                        help="tensor type (default: f32 for gguf-lora and safetensors, f16 for gguf)")
    export.set_defaults(run=_export)

    inspect = commands.add_parser("inspect", help="show modules, targets, trainable parameters, adapter files")
    inspect.add_argument("--model")
    inspect.add_argument("--task", default="causal-lm", choices=TASKS)
    inspect.add_argument("--config", help="YAML run config whose lora section to apply")
    inspect.add_argument("--adapter", help="adapter folder to summarise")
    inspect.add_argument("--memory", action="store_true",
                         help="estimate the peak memory of training with --config, without loading weights")
    inspect.set_defaults(run=_inspect)

    demo = commands.add_parser("demo", help="fine-tune SmolLM2-135M on movie-review sentiment, before/after")
    demo.add_argument("--output", help=f"output folder (default: {DEMO_OUTPUT}, or {DEMO_OUTPUT}-2, -3, ... when "
                      "that holds an earlier demo)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    demo.add_argument("--quiet", action="store_const", const=True, default=None,
                      help="no progress bars (the default when stderr is not a terminal)")
    demo.set_defaults(run=_demo)

    from .serve.command import add_serve_parser  # light: the server's imports wait until it runs
    add_serve_parser(commands)
    return parser


def _quiet_libraries() -> None:
    """Keep transformers' own progress bars and warnings off the terminal when it is not interactive."""
    from loratune.import_noise import silence_import_noise

    silence_import_noise()  # before transformers imports torchao
    from transformers.utils import logging

    logging.set_verbosity_error()
    if not sys.stderr.isatty():
        logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        code = args.run(args)
    except LoratuneError as exc:
        from loratune.train.stop_signals import RunStopped  # imported already when one was raised

        if isinstance(exc, RunStopped):
            print(f"loratune: {exc.message(_resume_command(args))}", file=sys.stderr)
            return exc.exit_code
        if args.debug:
            raise
        if not isinstance(exc, ReportedByAnotherRank):  # under torchrun, rank 0 says it once
            print(f"loratune: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unreadable or unwritable paths the user gave
        if args.debug:
            raise
        print(f"loratune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loratune: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
