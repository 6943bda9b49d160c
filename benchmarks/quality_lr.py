"""Learning rates for the quality parity: `python -m benchmarks quality-lr`.

Each setting (full fine-tuning, LoRA r=8 on query/value + head, optionally LoRA r=8 on every linear layer of
the encoder + head) gets its learning rate from a small grid, chosen by accuracy on a validation part carved
from the TRAINING split; the held-out split is used only afterwards, by the final runs at the chosen rates
(more epochs, several seeds). Every run goes through `benchmarks.quality.run_one`, the harness's one path.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from benchmarks.quality import SEED, QualityOptions, load_data, run_one

# name -> (kind, rank, LoRA targets, learning-rate grid)
SETTINGS: dict[str, tuple[str, int, str | tuple[str, ...], tuple[float, ...]]] = {
    "full": ("full", 0, (), (2e-5, 5e-5, 1e-4)),
    # 1e-2 added after 3e-3, the old grid's top, won the sweep (2000 training reviews, 2026-12-05)
    "lora-qv": ("lora", 8, ("query", "value"), (3e-4, 1e-3, 3e-3, 1e-2)),
    "lora-all": ("lora", 8, "all-linear", (3e-4, 1e-3, 3e-3, 1e-2)),
}
SETTING_NAMES = {"full": "full fine-tuning", "lora-qv": "LoRA r=8 (query, value + head)",
                 "lora-all": "LoRA r=8 (all linear + head)"}


@dataclass(frozen=True)
class Splits:
    """What a run trains on (`train`) and scores on (`eval`): the harness's splits, or a sweep's fit and
    validation parts of the training split."""

    train: Sequence[Any]
    eval: Sequence[Any]


def carve_validation(train: Sequence[Any], records: int | None, fraction: float, seed: int = SEED) -> Splits:
    """A seeded subset of `records` training examples (all when None), split into fit and validation parts,
    so that a sweep chooses without ever seeing the held-out split."""
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    order = order[:records] if records else order
    n_val = min(len(order) - 1, max(1, round(fraction * len(order))))
    return Splits([train[i] for i in order[n_val:]], [train[i] for i in order[:n_val]])


def sweep(lrs: Sequence[float], splits: Splits, score: Callable[[float, Splits], dict]) -> dict[str, Any]:
    """Score each rate on `splits` (fit / validation); the chosen rate has the best validation accuracy, the
    smaller rate on a tie (the grid's order)."""
    trials = []
    for lr in lrs:
        run = score(lr, splits)
        trials.append({"lr": lr, "val_accuracy": run["accuracy"], "train_s": run["train_s"],
                       "trainable_params": run["trainable_params"]})
    best = max(trials, key=lambda t: t["val_accuracy"])  # max keeps the first of equals
    return {"trials": trials, "chosen_lr": best["lr"]}


def scorer(setting: str, label_names: list[str], pad_id: int, opts: QualityOptions) -> Callable[..., dict]:
    """score(lr, splits[, seed]): one harness run of `setting` at that rate."""
    kind, r, targets, _ = SETTINGS[setting]

    def score(lr: float, splits: Splits, seed: int = SEED) -> dict:
        return run_one(kind, r, splits, label_names, pad_id, replace(opts, seed=seed), lr=lr, targets=targets)

    return score


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks quality-lr", description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", action="append", choices=sorted(SETTINGS),
                        help="settings to run (repeatable; default full and lora-qv)")
    parser.add_argument("--sweep-records", type=int, default=2500,
                        help="training examples the sweep uses, validation part included (default 2500)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="validation part of those (default 0.2)")
    parser.add_argument("--sweep-epochs", type=int, default=1, help="epochs per sweep run (default 1)")
    parser.add_argument("--train-records", type=int, default=None,
                        help="training examples of the final runs (default: the whole training split)")
    parser.add_argument("--eval-records", type=int, default=None,
                        help="held-out examples the final runs score on (default: the whole held-out split)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the final runs (default 3)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[SEED], help="seeds of the final runs (default 0)")
    parser.add_argument("--lr", action="append", default=[], metavar="SETTING=LR",
                        help="skip the sweep of SETTING and use LR (repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--quick", action="store_true", help="tiny subsets, a smoke test")
    parser.add_argument("--stem", default=None,
                        help="write benchmarks/results/STEM.{json,md} and leave the docs alone (for settings run "
                             "in separate processes; --merge joins them)")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="join results files of separate processes into quality-lr.{json,md} and the docs")
    return parser


def main(argv: list[str]) -> int:
    """Sweep, then the final runs; the results file is rewritten after every run, so a cut run leaves them."""
    import torch

    from benchmarks.quality_lr_report import write_quality_lr

    args = build_parser().parse_args(argv)
    if args.merge:
        return merge_files(args.merge)
    settings = args.setting or ["full", "lora-qv"]
    try:
        given = {k: float(v) for k, v in (item.split("=", 1) for item in args.lr)}
    except ValueError:
        print(f"quality-lr: --lr takes SETTING=LR, got {args.lr}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = QualityOptions(epochs=args.sweep_epochs, quick=args.quick,
                          max_train_records=128 if args.quick else args.train_records,
                          max_eval_records=64 if args.quick else args.eval_records)
    sweep_records = 64 if args.quick else args.sweep_records
    start = time.perf_counter()
    data, label_names, tokenizer = load_data(opts)
    carved = carve_validation(data.train, sweep_records, args.val_fraction)
    results: dict[str, Any] = {"meta": {}, "sweeps": {}, "runs": []}

    def save() -> None:
        results["meta"] = _meta(opts, args, settings, len(carved.train), len(carved.eval), len(data.train),
                                len(data.eval), time.perf_counter() - start)
        write_quality_lr(results, stem=args.stem or "quality-lr", docs=args.stem is None)

    chosen = {}
    for setting in settings:
        if setting in given:
            chosen[setting] = given[setting]
            results["sweeps"][setting] = {"trials": [], "chosen_lr": given[setting], "given": True}
            continue
        score = scorer(setting, label_names, tokenizer.pad_token_id, opts)
        results["sweeps"][setting] = sweep(SETTINGS[setting][3], carved, score)
        chosen[setting] = results["sweeps"][setting]["chosen_lr"]
        save()
    final = replace(opts, epochs=args.epochs)
    for seed in args.seeds:
        for setting in settings:
            run = scorer(setting, label_names, tokenizer.pad_token_id, final)(chosen[setting], data, seed)
            results["runs"].append({"setting": setting, "lr": chosen[setting], "seed": seed, **run})
            save()
    save()
    print(f"quality-lr: done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


def merge_files(paths: list[str]) -> int:
    """--merge: the files' sweeps and runs as one results file and docs section."""
    import json
    from pathlib import Path

    from benchmarks.quality_lr_report import merge, write_quality_lr

    try:
        results = merge([json.loads(Path(p).read_text()) for p in paths])
    except (OSError, ValueError, KeyError) as exc:
        print(f"quality-lr --merge: {exc}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in write_quality_lr(results)))
    return 0


def _meta(opts: QualityOptions, args: argparse.Namespace, settings: list[str], n_fit: int, n_val: int,
          n_train: int, n_eval: int, wall_s: float) -> dict[str, Any]:
    import datetime as dt

    import torch

    from benchmarks.runner import cpu_model

    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m benchmarks " + " ".join(sys.argv[1:]), "settings": settings,
            "sweep_fit_examples": n_fit, "sweep_val_examples": n_val, "sweep_epochs": args.sweep_epochs,
            "train_examples": n_train, "eval_examples": n_eval, "epochs": args.epochs, "seeds": args.seeds,
            "torch": torch.__version__, "cpu": cpu_model(), "threads": torch.get_num_threads(),
            "wall_s": round(wall_s, 1), **{k: v for k, v in asdict(opts).items() if k not in ("epochs", "ranks")}}
