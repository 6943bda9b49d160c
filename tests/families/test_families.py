"""The family matrix: each popular model family, tiny and random, through loratune's public entry points.

For each family: a few training steps (`loratune.train.fit`) under every batching it supports, with the
first steps' losses equal to the padded batch's (or a one-line warning naming the batching used instead);
the saved adapter loads in PEFT with equal logits; merging equals the unmerged adapter; generation works;
causal LMs answer a request through the server. With LORATUNE_FAMILIES_JSON set, each check's outcome is
appended there (docs/write_models.py turns that into docs/models.md).
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
import transformers
from families import FAMILIES, VOCAB, Family, make_tokenizer

import loratune as lt
from loratune.train import fit
from loratune.train.run_config import validate_config

BATCHINGS = ("padded", "packed", "shared_prefix")
STEPS = 3
WORDS = [w for w in VOCAB if w.isalpha() and w not in ("user", "assistant")]
PARAMS = [pytest.param(f, id=f.name.replace(" ", "")) for f in FAMILIES]


def record(family: Family, check: str, outcome: str) -> None:
    """Append one outcome for docs/models.md (only when the matrix is run to write it)."""
    path = os.environ.get("LORATUNE_FAMILIES_JSON")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"family": family.name, "kind": family.kind, "check": check,
                                  "outcome": outcome, "transformers": transformers.__version__}) + "\n")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Model folders, built on first use."""
    made: dict[str, str] = {}

    def folder(family: Family) -> str:
        if family.name not in made:
            path = tmp_path_factory.mktemp(family.model_class)
            family.build(len(VOCAB)).save_pretrained(path)
            make_tokenizer().save_pretrained(path)
            made[family.name] = str(path)
        return made[family.name]
    return folder


def data_file(folder, family: Family):
    """Records whose columns say their format: prompts of several lengths that start alike (so a shared
    prefix and padding both exist), or labelled texts for a classifier."""
    rng = random.Random(0)
    rows = []
    for i in range(24):
        words = " ".join(rng.choice(WORDS) for _ in range((1, 2, 3, 16)[i % 4]))  # short ones share a packed row
        if family.kind == "encoder":
            rows.append({"text": f"the {words} movie", "label": "positive" if i % 2 else "negative"})
        else:
            rows.append({"prompt": f"the cat sat on a mat . {words} ?", "completion": rng.choice(WORDS)})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def runs(folders, tmp_path_factory):
    """`fit` runs, one per (family, batching), made on first use: (summary, history, stderr, output folder)."""
    done: dict[tuple[str, str], tuple] = {}

    def run(family: Family, batching: str, capfd) -> tuple:
        key = (family.name, batching)
        if key not in done:
            out = tmp_path_factory.mktemp(f"run-{family.model_class}-{batching}")
            config = validate_config({
                "model": {"name": folders(family), "task": family.task},
                "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"},
                "data": {"train": data_file(out, family), "validation_fraction": 0.25, "max_eval_records": 4,
                         "max_length": 48},
                "train": {"max_steps": STEPS, "batch_size": 4, "learning_rate": 0.01, "precision": "fp32",
                          "eval_batch_size": 4, "max_new_tokens": 2, "num_samples": 0, "seed": 0,
                          "batching": batching, "schedule": "constant"},
                "output_dir": str(out / "run"),
            }, "matrix")
            capfd.readouterr()
            summary = fit(config, quiet=True)
            err = capfd.readouterr().err
            history = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
            done[key] = (summary, [r["loss"] for r in history if r["kind"] == "train"], err, out / "run")
        return done[key]
    return run


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("loratune: warning")]


# Packed and shared-prefix batches are for causal LMs (the config refuses them for other tasks).
RUNS = [pytest.param(f, b, id=f"{f.name.replace(' ', '')}-{b}") for f in FAMILIES
        for b in (BATCHINGS if f.kind == "causal" else ("padded",))]


@pytest.mark.parametrize(("family", "batching"), RUNS)
def test_training_under_each_batching_matches_the_padded_batch(family, batching, runs, capfd):
    summary, losses, err, _ = runs(family, batching, capfd)
    assert summary["steps"] == STEPS and len(losses) == STEPS
    assert all(torch.isfinite(torch.tensor(losses)))
    assert "Traceback" not in err
    said = warnings_in(err)
    if batching != "padded":
        _, padded, _, _ = runs(family, "padded", capfd)
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(padded), rtol=1e-4, atol=1e-5)
    record(family, batching, "ok" if not said else "falls back: " + said[0].removeprefix("loratune: warning: "))


def base_model(family: Family, folder: str):
    cls = getattr(transformers, family.model_class)
    return cls.from_pretrained(folder).eval()


def inputs(family: Family) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[VOCAB[w] for w in "the cat sat on a mat . good movie".split()]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family.kind == "seq2seq":
        batch["decoder_input_ids"] = ids[:, :4]
    return batch


@pytest.mark.parametrize("family", PARAMS)
def test_the_adapter_loads_in_peft_merges_and_generates(family, runs, folders, capfd):
    from peft import PeftModel

    _, _, _, out = runs(family, "padded", capfd)
    adapter = out / "adapter"
    batch = inputs(family)
    ours = base_model(family, folders(family))
    lt.load_adapter(ours, adapter)
    with torch.no_grad():
        expected = ours(**batch).logits
        with lt.disable_adapters(ours):
            base = ours(**batch).logits
    assert (expected - base).abs().max() > 1e-4, "the trained adapter changes nothing"
    peft_model = PeftModel.from_pretrained(base_model(family, folders(family)), str(adapter)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, expected, rtol=1e-4, atol=1e-5)
    record(family, "PEFT loads", "ok")

    lt.merge(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, expected, rtol=1e-4, atol=1e-5)
    record(family, "merge", "ok")

    if family.kind == "encoder":
        record(family, "generate", "n/a (classifier)")
        return
    lt.unmerge(ours)
    generated = ours.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=4,
                              do_sample=False, pad_token_id=0)
    assert generated.shape[1] >= 2
    record(family, "generate", "ok")


@pytest.mark.parametrize("family", [p for p in PARAMS if p.values[0].kind == "causal"])
def test_a_causal_lm_answers_through_the_server(family, runs, folders, capfd):
    from fastapi.testclient import TestClient

    from loratune.pretrained import load_model
    from loratune.serve.command import build

    _, _, _, out = runs(family, "padded", capfd)
    model, tokenizer = load_model(folders(family), "causal-lm")
    app, engine = build(model, tokenizer, "tiny", [("tuned", str(out / "adapter"))])
    try:
        with TestClient(app) as client:
            reply = client.post("/v1/completions", json={"model": "tuned", "prompt": "the cat sat on a mat .",
                                                          "max_tokens": 3, "temperature": 0})
    finally:
        engine.stop()
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] is not None
    record(family, "serve", "ok")
