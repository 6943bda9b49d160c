"""`loratune compare` end to end on tiny models: every method on the same split, a table and a plot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from loratune.compare import compare_markdown, summarise
from loratune.train.run_config import validate_config

SRC = str(Path(__file__).resolve().parents[1] / "src")


def loratune(*args, cwd):
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "loratune", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, check=False)


def test_compare_runs_base_lora_and_full_and_writes_the_table(run_config, tmp_path):
    data = run_config(train={"max_steps": 4})
    validate_config(data, "test")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    done = loratune("compare", "run.yaml", "--methods", "base,lora,full", "--seeds", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # the children are as quiet as the command: only loratune's own lines, no library chatter
    assert all(line.startswith("loratune: ") for line in done.stderr.splitlines()), done.stderr
    out = tmp_path / "run"
    results = json.loads((out / "compare.json").read_text())
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [
        ("base", 0), ("lora", 0), ("lora", 1), ("full", 0), ("full", 1)]
    rows = {r["method"]: r for r in results["rows"]}
    assert rows["base"]["trainable_parameters"] == 0 and rows["base"]["train_seconds"] == 0.0
    assert 0 < rows["lora"]["trainable_parameters"] < rows["full"]["trainable_parameters"]
    assert 0 < rows["lora"]["output_mb"] < rows["full"]["output_mb"]
    assert len(rows["lora"]["values"]) == 2 and rows["lora"]["sd"] is not None
    for row in rows.values():
        assert row["metric"] == "accuracy" and 0.0 <= row["mean"] <= 1.0 and row["peak_rss_mb"] > 0
    # every method is evaluated on the same held-out examples, the base on the untrained model
    before = json.loads((out / "lora-seed0" / "run" / "metrics.json").read_text())["before"]
    assert results["runs"][0]["metrics"]["accuracy"] == before["accuracy"]
    assert results["runs"][0]["metrics"]["loss"] == before["loss"]
    table = (out / "compare.md").read_text()
    assert "general_perplexity" in table and rows["base"]["general_perplexity"] > 1.0  # forgetting, per method
    assert "| base (zero-shot) |" in table and "| LoRA |" in table and "| full fine-tuning |" in table
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = loratune("compare", "run.yaml", "--methods", "lora", "--seeds", "1", cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"loratune: error: {out}: holds an earlier comparison; set output_dir to a new folder"]


def test_unknown_methods_are_one_line_errors(run_config, tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_config()))
    done = loratune("compare", "run.yaml", "--methods", "lora,qlora", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "loratune: error: --methods: unknown qlora; choose from base, lora, full"
    assert not (tmp_path / "run").exists()


def test_the_table_gives_mean_and_sample_spread():
    runs = [{"method": "lora", "seed": s, "metrics": {"accuracy": a}, "train_seconds": 2.0, "peak_rss_mb": 100.0,
             "trainable_parameters": 10, "output_bytes": 2**20} for s, a in enumerate([0.8, 0.9, 1.0])]
    rows = summarise(runs)
    assert rows[0]["mean"] == 0.9 and abs(rows[0]["sd"] - 0.1) < 1e-12
    table = compare_markdown({"model": "m", "task": "causal-lm", "data": "d", "data_seed": 0, "seeds": 3,
                              "rows": rows})
    assert "| LoRA | 0.9000 ± 0.1000 | 2.0 | 100 | 10 | 1.00 |" in table


def test_the_base_of_a_classifier_is_a_trained_linear_probe(run_config, tmp_path, tiny_bert):
    from loratune.compare import run_job

    data = run_config(method="head", model={"name": tiny_bert, "task": "classification"}, lora=None,
                      data={"prompt_template": None, "completion_template": None}, train={"max_steps": 3})
    config = validate_config(data, "test").model_dump(mode="json")
    job = tmp_path / "base-seed0" / "compare-job.json"
    job.parent.mkdir()
    job.write_text(json.dumps({"config": config, "method": "base", "seed": 0}))
    assert run_job(str(job)) == 0
    result = json.loads(job.read_text())
    summary = json.loads((job.parent / "run" / "metrics.json").read_text())
    assert summary["method"] == "head" and summary["steps"] == 3
    assert result["train_seconds"] > 0 and 0 < result["trainable_parameters"] < 100  # the head: 32 x 2 + 2
    assert "accuracy" in result["metrics"]


def test_a_method_the_config_cannot_run_is_refused_before_any_run(run_config, tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_config(model={"quantize": "int8"})))
    done = loratune("compare", "run.yaml", "--methods", "lora,full", cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("loratune: error: compare --methods full: method: full trains dense weights")
    assert not (tmp_path / "run" / "lora-seed0").exists()


def test_the_frozen_bases_dtype_stays_with_the_lora_run(run_config, tmp_path):
    from loratune.compare import job_config

    data = run_config(model={"dtype": "bfloat16"})  # a LoRA run's 16-bit base
    lora = job_config(data, "lora", 0, tmp_path / "lora")
    full = job_config(data, "full", 0, tmp_path / "full")
    assert lora.model.dtype == "bfloat16" and full.model.dtype == "auto" and full.method == "full"
