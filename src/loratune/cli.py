"""The `loratune` command: parses arguments and calls the library functions, nothing more.

Any user error ends with exit code 2 and one line on stderr (a traceback only with --debug).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any, NoReturn

from loratune.core.errors import LoratuneError
from loratune.errors import ReportedByAnotherRank
from loratune.import_noise import quiet_libraries
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
    """`loratune train --nproc N`: the same command as N ranks on this machine (see loratune.launch)."""
    from loratune.launch import launch

    if already:
        raise LoratuneError("--nproc: already running under torchrun; leave --nproc out")
    return launch([*(["--debug"] if args.debug else []), "train", args.config,
                   *[f"--set={assignment}" for assignment in args.set], *(["--resume"] if args.resume else []),
                   *(["--quiet"] if args.quiet else [])], args.nproc)


def _resume_command(args: argparse.Namespace) -> str:
    """The command that continues a stopped `loratune train` (or `demo`) run, as the user would type it."""
    if args.command == "demo":  # the demo's resolved config, written when its training starts
        words = ["loratune", "train", str(Path(args.output) / "config.yaml")]
    else:
        from loratune.launch import launched_nproc

        words = ["loratune", "train", args.config]
        words += [part for assignment in args.set for part in ("--set", assignment)]
        nproc = launched_nproc()
        words += ["--nproc", str(nproc)] if nproc else []
    return "`" + shlex.join([*words, "--resume"]) + "`"


def _print_summary(summary: dict, out: Path) -> None:
    before, after = summary["before"], summary["after"]
    print(f"trained {summary['steps']} steps in {summary['train_seconds']:.1f} s "
          f"({summary['tokens_per_second']:.0f} tokens/s, peak RSS {summary['peak_rss_mb']:.0f} MiB, "
          f"gradient checkpointing {summary.get('gradient_checkpointing', 'off')})")
    for key in after:
        if isinstance(after[key], float):
            print(f"  {key}: {before.get(key, float('nan')):.4f} -> {after[key]:.4f}")
    saved = "adapter" if summary.get("method", "lora") == "lora" else "model"
    print(f"{saved + ':':9}{summary['adapter_dir']}\nreport:  {out / 'report.md'}")
    if (out / "plot.png").is_file():
        print(f"plot:    {out / 'plot.png'}")


def _eval(args: argparse.Namespace) -> None:
    from loratune.train import evaluate_run, load_config

    config = load_config(args.config, args.set)
    metrics = evaluate_run(config, adapter=args.adapter, quiet=args.quiet)
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


def _compare(args: argparse.Namespace) -> None:
    from loratune.compare import compare
    from loratune.train import load_config

    config = load_config(args.config, args.set)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    results = compare(config, methods, args.seeds)
    for row in results["rows"]:
        spread = f" ± {row['sd']:.4f}" if row["sd"] is not None else ""
        print(f"{row['method']:>5}: {row['metric']} {row['mean']:.4f}{spread}, {row['train_seconds']:.1f} s, "
              f"peak {row['peak_rss_mb']:.0f} MiB, {row['trainable_parameters']:,} trainable")
    print(f"table: {Path(config.output_dir) / 'compare.md'}")


def _sweep(args: argparse.Namespace) -> None:
    from loratune.sweep import sweep
    from loratune.train import load_config

    config = load_config(args.config, args.set)
    result = sweep(config, args.trials, args.storage, args.study, args.heartbeat)
    print(f"{len(result['trials'])} trials in the study")
    if result["best"]:
        best = result["best"]
        print(f"best: trial {best['number']}, validation loss {best['value']:.4f}, {best['params']}")
    print(f"table: {Path(config.output_dir) / 'sweep.md'}")


def _generate(args: argparse.Namespace) -> None:
    from loratune.generate import generate_stream

    generate_stream(args.model, args.prompt, adapter=args.adapter, chat=args.chat,
                    max_new_tokens=args.max_new_tokens, out=sys.stdout, task=args.task, quantize=args.quantize,
                    precision=args.precision)


def _merge(args: argparse.Namespace) -> None:
    from .export.merged_folder import write_merged_folder

    out = write_merged_folder(args.model, args.adapter, args.out, args.task)
    print(f"merged model written to {out}")


def _export(args: argparse.Namespace) -> None:
    from .extras import require_extra

    require_extra("export", "loratune export")
    from .export import export

    for path in export(args.adapter_dir, args.model, args.format, args.out, args.dtype, force=args.force):
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
    """An argparse type: an integer of at least 1 (a bad one is argparse's one-line error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line like every other user error, not the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"loratune: error: {message}\n")


PRECISIONS = ("fp32", "auto", "bf16")  # `--precision` of generate and serve; the first is the default


def add_precision_option(command: argparse.ArgumentParser) -> None:
    """`--precision` of `generate` and `serve`, one option so both choose the base's dtype alike."""
    command.add_argument("--precision", choices=PRECISIONS, default=PRECISIONS[0],
                         help="the base model's weights: fp32 (the default: a request's greedy tokens are the same "
                              "alone or batched), bf16 where the CPU probe measured native bf16 products faster "
                              "(auto), or bf16 always: faster, but batching may then change a near-tie token")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="loratune", description="LoRA fine-tuning of language models")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_run_commands(commands)
    _add_model_commands(commands)
    from .serve.command import add_serve_parser  # light: the server's imports wait until it runs
    add_precision_option(add_serve_parser(commands))
    return parser


def _with_config(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("config", help="YAML run config")
    sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. train.max_steps=50 (repeatable)")
    sub.add_argument("--quiet", action="store_const", const=True, default=None,
                     help="no progress bars (the default when stderr is not a terminal)")


def _add_run_commands(commands: Any) -> None:
    """The commands that run a YAML config: train, eval, compare, sweep, and the embedded demo."""
    train = commands.add_parser("train", help="train a LoRA adapter from a YAML config")
    _with_config(train)
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    train.add_argument("--nproc", type=_positive_int, metavar="N",
                       help="train with N processes on this machine (launches torchrun; see docs/distributed.md)")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="evaluate a model (and adapter) on a config's evaluation data")
    _with_config(evaluate)
    evaluate.add_argument("--adapter", help="adapter folder (default: the config's output_dir/adapter)")
    evaluate.set_defaults(run=_eval)

    compare = commands.add_parser("compare", help="train the same task by several methods and tabulate them")
    _with_config(compare)
    compare.add_argument("--methods", default="base,lora,full",
                         help="comma-separated: base (zero-shot, or a linear probe for classifiers), lora, full")
    compare.add_argument("--seeds", type=_positive_int, default=3, help="runs per method (train.seed, +1, ...)")
    compare.set_defaults(run=_compare)

    sweep = commands.add_parser("sweep", help="search learning rate, rank, alpha and targets with Optuna")
    _with_config(sweep)
    sweep.add_argument("--trials", type=_positive_int, required=True, help="trials in the study, over all workers")
    sweep.add_argument("--storage", help="Optuna storage URL (default: SQLite sweep.db in the output folder); "
                       "workers that name the same storage and study share one sweep")
    sweep.add_argument("--study", help="study name (default: loratune-sweep)")
    sweep.add_argument("--heartbeat", type=float, default=10.0, metavar="SECONDS",
                       help="a worker's heartbeat; a trial silent for 3x this (a killed worker's) is run again")
    sweep.set_defaults(run=_sweep)

    demo = commands.add_parser("demo", help="fine-tune SmolLM2-135M on movie-review sentiment, before/after")
    demo.add_argument("--output", help=f"output folder (default: {DEMO_OUTPUT}, or {DEMO_OUTPUT}-2, -3, ... when "
                      "that holds an earlier demo)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    demo.add_argument("--quiet", action="store_const", const=True, default=None,
                      help="no progress bars (the default when stderr is not a terminal)")
    demo.set_defaults(run=_demo)


def _add_model_commands(commands: Any) -> None:
    """The commands that take a model (and adapter) directly: generate, merge, export, inspect."""
    generate = commands.add_parser("generate", help="generate text, streaming tokens to the terminal")
    generate.add_argument("--model", required=True)
    generate.add_argument("--adapter")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt with the model's chat template")
    generate.add_argument("--task", choices=["causal-lm", "seq2seq"],
                          help="model kind (default: the adapter's task type, else causal-lm)")
    generate.add_argument("--max-new-tokens", type=_positive_int, default=64)
    generate.add_argument("--quantize", choices=["none", "nf4", "int8"], default="none",
                          help="store the base model's linear layers quantized, as `loratune serve --quantize` does")
    add_precision_option(generate)
    generate.set_defaults(run=_generate)

    merge = commands.add_parser("merge", help="write a plain model folder with the adapter merged in")
    merge.add_argument("--model", required=True)
    merge.add_argument("--adapter", required=True)
    merge.add_argument("--out", required=True)
    merge.add_argument("--task", choices=TASKS, help="model kind (default: the adapter's task type, else causal-lm)")
    merge.set_defaults(run=_merge)

    export = commands.add_parser("export", help="write an adapter for llama.cpp / Ollama (GGUF) or a merged model")
    export.add_argument("adapter_dir")
    export.add_argument("--model", required=True, help="the base model: a folder, a .gguf file or a built-in name")
    export.add_argument("--format", required=True, choices=["gguf-lora", "gguf", "safetensors"])
    export.add_argument("--out", required=True, help="the .gguf file (or, for safetensors, the folder) to write")
    export.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0"],
                        help="tensor type (default: f32 for gguf-lora and safetensors, f16 for gguf)")
    export.add_argument("--force", action="store_true",
                        help="replace an existing --out (or its Modelfile) that is not a GGUF file (or Modelfile)")
    export.set_defaults(run=_export)

    inspect = commands.add_parser("inspect", help="show modules, targets, trainable parameters, adapter files")
    inspect.add_argument("--model")
    inspect.add_argument("--task", choices=TASKS, help="model kind (default: the adapter's task type, else causal-lm)")
    inspect.add_argument("--config", help="YAML run config whose lora section to apply")
    inspect.add_argument("--adapter", help="adapter folder to summarise")
    inspect.add_argument("--memory", action="store_true",
                         help="estimate the peak memory of training with --config, without loading weights")
    inspect.set_defaults(run=_inspect)


#: Commands that run a model for long (train, evaluate, serve, convert): the program restarts itself under
#: jemalloc for these (`allocator`), and for `inspect --memory`, whose estimate must be the one `train` makes
#: (it depends on the malloc); other `inspect`s and `--help` start once.
LONG_COMMANDS = frozenset({"train", "eval", "compare", "sweep", "demo", "serve", "generate", "merge", "export"})


def program() -> int:
    """The `loratune` program (console script, `python -m loratune`): first, for a long command, the process's
    preferred malloc (which may restart it), then `main` on its own arguments."""
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    if command in LONG_COMMANDS or (command == "inspect" and "--memory" in sys.argv):
        from loratune.allocator import use_preferred_malloc

        if not use_preferred_malloc("loratune"):
            return 2
    return main()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    quiet_libraries()
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
    sys.exit(program())
