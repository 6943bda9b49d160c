"""The quality benchmark's learning-rate sweep: it chooses by validation accuracy on a part of the training
split, and the held-out split is read only by the final runs (tiny BERT classifier, a learnable toy task)."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import bert_classifier

from benchmarks import quality, quality_lr, quality_lr_report
from benchmarks.quality_lr import Splits, carve_validation, sweep


def toy_examples(count: int, seed: int) -> list[dict]:
    """Label 1 when token 5 leads, 0 when token 6 does; the rest is noise, so a model learns it or not."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        label = i % 2
        out.append({"input_ids": [5 if label else 6] + [rng.randrange(10, 60) for _ in range(7)], "label": label,
                    "id": (seed, i)})
    return out


class HeldOut(list):
    """A held-out split that logs every read of its examples, so a test can say when it was touched."""

    def __init__(self, items: list, log: list) -> None:
        super().__init__(items)
        self.log = log

    def __getitem__(self, index):
        self.log.append(index)
        return super().__getitem__(index)

    def __iter__(self):
        self.log.append("iter")
        return super().__iter__()


def test_carve_validation_splits_a_seeded_subset_of_training_examples_into_disjoint_parts():
    train = toy_examples(100, seed=1)
    carved = carve_validation(train, records=50, fraction=0.2, seed=0)
    assert (len(carved.train), len(carved.eval)) == (40, 10)
    fit_ids, val_ids = {e["id"] for e in carved.train}, {e["id"] for e in carved.eval}
    assert not fit_ids & val_ids and fit_ids | val_ids <= {e["id"] for e in train}
    assert carve_validation(train, 50, 0.2, seed=0) == carved
    assert carve_validation(train, 50, 0.2, seed=1) != carved
    assert len(carve_validation(train, None, 0.25).eval) == 25


def test_sweep_chooses_the_best_validation_accuracy_and_the_first_of_equals():
    seen = []

    def score(lr, splits):
        seen.append(splits)
        return {"accuracy": {1e-4: 0.7, 1e-3: 0.9, 1e-2: 0.9}[lr], "train_s": 0.0, "trainable_params": 1}

    splits = Splits([1], [2])
    result = sweep([1e-4, 1e-3, 1e-2], splits, score)
    assert result["chosen_lr"] == 1e-3
    assert [t["val_accuracy"] for t in result["trials"]] == [0.7, 0.9, 0.9]
    assert seen == [splits] * 3


def test_harness_sweep_trains_for_real_and_never_reads_the_held_out_split(monkeypatch):
    """quality-lr's main() with the minilm model and data swapped for a tiny BERT and the toy task: the rate
    that learns is chosen, and the held-out split is read only after every sweep has finished."""
    log: list = []
    held_out = HeldOut(toy_examples(32, seed=2), log)

    class Data:
        train = toy_examples(160, seed=3)
        eval = held_out

    class Tokenizer:
        pad_token_id = 0

    def tiny_build(kind, r, label_names, opts, quantize="none", targets=("query", "value")):
        import loratune

        model = bert_classifier(seed=opts.seed, num_labels=2)
        if kind == "lora":
            torch.manual_seed(opts.seed)
            loratune.add_adapter(model, loratune.LoraConfig(
                r=r, lora_alpha=2 * r, target_modules=targets if isinstance(targets, str) else list(targets),
                modules_to_save=["classifier"], task_type="SEQ_CLS"))
        return model

    real_sweep, written = quality_lr.sweep, []

    def checked_sweep(lrs, splits, score):
        assert splits.eval is not held_out and splits.train is not held_out
        result = real_sweep(lrs, splits, score)
        assert log == [], "a sweep read the held-out split"
        return result

    monkeypatch.setattr(quality, "build", tiny_build)
    monkeypatch.setattr(quality_lr, "load_data", lambda opts: (Data(), ["neg", "pos"], Tokenizer()))
    monkeypatch.setattr(quality_lr, "sweep", checked_sweep)
    monkeypatch.setattr(quality_lr, "SETTINGS", {"full": ("full", 0, (), (1e-7, 1e-2)),
                                                 "lora-qv": ("lora", 4, ("query", "value"), (1e-7, 3e-2))})
    monkeypatch.setattr(quality_lr_report, "write_quality_lr", lambda results, **kw: written.append(results))

    code = quality_lr.main(["--setting", "full", "--setting", "lora-qv", "--sweep-records", "160",
                            "--sweep-epochs", "3", "--epochs", "1", "--seeds", "0"])
    assert code == 0
    results = written[-1]
    for setting, grid in (("full", (1e-7, 1e-2)), ("lora-qv", (1e-7, 3e-2))):
        trials = results["sweeps"][setting]["trials"]
        assert [t["lr"] for t in trials] == list(grid)
        assert trials[1]["val_accuracy"] >= 0.9 > trials[0]["val_accuracy"]
        assert results["sweeps"][setting]["chosen_lr"] == grid[1]
    assert [(r["setting"], r["lr"]) for r in results["runs"]] == [("full", 1e-2), ("lora-qv", 3e-2)]
    assert log, "the final runs score on the held-out split"
    assert (results["meta"]["sweep_fit_examples"], results["meta"]["sweep_val_examples"]) == (128, 32)
    assert results["meta"]["eval_examples"] == 32


def test_merge_refuses_results_of_different_sizes():
    meta = {"sweep_fit_examples": 10, "sweep_val_examples": 2, "sweep_epochs": 1, "train_examples": 12,
            "eval_examples": 5, "epochs": 3, "command": "c", "settings": ["full"], "wall_s": 1.0, "date": "d",
            "seeds": [0]}
    part = {"meta": meta, "sweeps": {"full": {"trials": [], "chosen_lr": 1e-5}}, "runs": []}
    other = {**part, "meta": {**meta, "train_examples": 13, "settings": ["lora-qv"]}}
    with pytest.raises(ValueError, match="differ"):
        quality_lr_report.merge([part, other])
    lora = {"meta": {**meta, "settings": ["lora-qv"]}, "sweeps": {"lora-qv": {"trials": [], "chosen_lr": 1e-3}},
            "runs": [{"setting": "lora-qv", "seed": 0}]}
    given = {"meta": meta, "sweeps": {"full": {"trials": [], "chosen_lr": 1e-5, "given": True}},
             "runs": [{"setting": "full", "seed": 1}]}
    merged = quality_lr_report.merge([given, part, lora])
    assert merged["meta"]["settings"] == ["full", "lora-qv"]
    assert merged["sweeps"] == {"full": part["sweeps"]["full"], "lora-qv": lora["sweeps"]["lora-qv"]}
    assert [r["seed"] for r in merged["runs"]] == [1, 0]
