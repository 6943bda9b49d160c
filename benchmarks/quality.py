"""Quality parity: `python -m benchmarks quality`.

minilm-l6 on the built-in movie-sentiment data (80/20 split, seed 0): full fine-tuning against loratune
LoRA on query/value with the classifier head trained (modules_to_save), the same epochs, batch and data;
the LoRA rank is swept over QUALITY_RANKS (r=8 is the headline comparison). Accuracy on the held-out split
and training wall time go to benchmarks/results/quality.{json,md,png} and docs/benchmarks.md.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from benchmarks.runner import cpu_model

QUALITY_RANKS = (1, 2, 4, 8, 16, 64)
QUICK_RANKS = (1, 8)
MODEL, DATASET = "minilm-l6", "movie-sentiment"
SEED = 0


@dataclass(frozen=True)
class QualityOptions:
    """Training settings shared by every run (only the learning rate differs between LoRA and full)."""

    epochs: int = 3
    batch_size: int = 32
    max_length: int = 64
    lr_lora: float = 1e-3
    lr_full: float = 5e-5
    lora_dropout: float = 0.1
    max_train_records: int | None = None
    max_eval_records: int | None = None
    ranks: tuple[int, ...] = QUALITY_RANKS
    quick: bool = False
    seed: int = SEED  # training randomness (head and LoRA init, dropout, batch order); the data split stays SEED


def load_data(opts: QualityOptions) -> tuple[Any, list[str], Any]:
    """The formatted splits, label names and tokenizer, through loratune.data and loratune.pretrained."""
    from loratune.data import DataConfig, load_datasets, read_label_names
    from loratune.pretrained import load_model

    cfg = DataConfig(train=DATASET, validation_fraction=0.2, max_length=opts.max_length, seed=SEED,
                     max_train_records=opts.max_train_records, max_eval_records=opts.max_eval_records)
    label_names = read_label_names(cfg)
    _, tokenizer = load_model(MODEL, "classification", label_names=label_names)
    return load_datasets(cfg, tokenizer, "classification"), label_names, tokenizer


def build(kind: str, r: int, label_names: list[str], opts: QualityOptions, quantize: str = "none",
          targets: str | list[str] = ("query", "value")) -> Any:
    """A fresh classifier; with kind 'lora', loratune LoRA r on `targets` (query/value unless told) plus the
    trained head. `quantize` stores the frozen linear layers in that format (the qlora benchmark's comparison)."""
    import loratune
    from loratune.pretrained import load_model

    torch.manual_seed(opts.seed)  # the new classifier head's init
    model, _ = load_model(MODEL, "classification", label_names=label_names, quantize=quantize)
    if kind == "lora":
        torch.manual_seed(opts.seed)
        config = loratune.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=opts.lora_dropout,
                                     target_modules=targets if isinstance(targets, str) else list(targets),
                                     modules_to_save=["classifier"], task_type="SEQ_CLS")
        loratune.add_adapter(model, config)
    return model


def batches(examples: Any, size: int, pad_id: int, shuffle_seed: int | None) -> list[dict[str, torch.Tensor]]:
    from loratune.batching import collate

    order = list(range(len(examples)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    return [collate([examples[i] for i in order[s:s + size]], pad_id, "classification")
            for s in range(0, len(order), size)]


def train(model: Any, data: Any, pad_id: int, lr: float, opts: QualityOptions) -> float:
    """Train for `opts.epochs` epochs with AdamW at a constant `lr`; returns the wall time in seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    start = time.perf_counter()
    for epoch in range(opts.epochs):
        for batch in batches(data.train, opts.batch_size, pad_id, opts.seed * 1000 + SEED + epoch):
            optimizer.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            optimizer.step()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model: Any, data: Any, pad_id: int) -> float:
    model.eval()
    correct = total = 0
    for batch in batches(data.eval, 128, pad_id, None):
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
        total += len(labels)
    return correct / total


def run_one(kind: str, r: int, data: Any, label_names: list[str], pad_id: int, opts: QualityOptions,
            lr: float | None = None, targets: str | list[str] = ("query", "value")) -> dict:
    """Build, train on `data.train` and score on `data.eval`: the one run every quality measurement makes.
    `lr` defaults to the options' rate for `kind`."""
    lr = lr if lr is not None else opts.lr_lora if kind == "lora" else opts.lr_full
    model = build(kind, r, label_names, opts, targets=targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    seconds = train(model, data, pad_id, lr, opts)
    result = {"kind": kind, "r": r if kind == "lora" else None, "accuracy": accuracy(model, data, pad_id),
              "train_s": seconds, "trainable_params": trainable}
    print(f"[quality] {kind}{'' if kind == 'full' else f' r={r}'} lr {lr:g} seed {opts.seed} "
          f"({len(data.train)} train / {len(data.eval)} scored, {opts.epochs} epoch(s)): accuracy "
          f"{result['accuracy']:.4f}, {seconds:.1f} s, {trainable:,} trainable", file=sys.stderr, flush=True)
    return result


def run_quality(epochs: int = 3, quick: bool = False, threads: int | None = None) -> int:
    """All runs (full fine-tuning, then each rank), then the JSON/markdown/plot and the docs section."""
    try:
        import loratune.data  # noqa: F401
        import loratune.pretrained  # noqa: F401
    except ImportError as exc:
        print(f"quality: unavailable ({exc})", file=sys.stderr)
        return 1
    if threads:
        torch.set_num_threads(threads)
    opts = QualityOptions(epochs=1 if quick else epochs, quick=quick, ranks=QUICK_RANKS if quick else QUALITY_RANKS,
                          max_train_records=128 if quick else None, max_eval_records=64 if quick else None)
    start = time.perf_counter()
    data, label_names, tokenizer = load_data(opts)
    runs = [run_one("full", 0, data, label_names, tokenizer.pad_token_id, opts)]
    runs += [run_one("lora", r, data, label_names, tokenizer.pad_token_id, opts) for r in opts.ranks]
    results = {"meta": _meta(opts, len(data.train), len(data.eval), time.perf_counter() - start), "runs": runs}
    from benchmarks.quality_report import write_quality

    paths = write_quality(results)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _meta(opts: QualityOptions, n_train: int, n_eval: int, wall_s: float) -> dict[str, Any]:
    import datetime as dt

    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "model": MODEL,
            "dataset": DATASET, "train_examples": n_train, "eval_examples": n_eval, "torch": torch.__version__,
            "cpu": cpu_model(), "threads": torch.get_num_threads(), "wall_s": round(wall_s, 1),
            "command": "python -m benchmarks " + " ".join(sys.argv[1:]), **asdict(opts)}

