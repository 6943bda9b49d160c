"""The race: the demo's whole job as `loratune demo` runs it, against TRL's `SFTTrainer` + PEFT on the same split,
each in a fresh process, alternated; then `loratune eval` scores both adapters with the same code.

    python -m benchmarks race [--rounds 1] [--steps 100] [--eval-records 300]

Both sides train SmolLM2-135M-Instruct on the demo's movie-sentiment split (the examples loratune's data
pipeline makes: chat-templated prompt, label answer), r=8 all-linear, batch 8, lr 3e-4, 10 warm-up steps,
cosine, in the precision loratune's `auto` resolves on the machine (bf16 only where it is native). Per process:
wall and CPU seconds, peak RSS (the kernel's count for that process alone), training seconds; loratune's
includes its own evaluation before and after training, as the demo runs it. TRL and accelerate are the
`bench` extra (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, run_child, write_result

LIBRARIES = ("loratune", "trl")


def overrides(steps: int, eval_records: int) -> list[str]:
    return [f"train.max_steps={steps}", f"data.max_eval_records={eval_records}"]


def trl_worker(steps: int, eval_records: int, out: Path) -> int:
    """TRL's side, in its own process: the demo's split and model, `SFTTrainer` with a PEFT LoRA; writes the
    adapter (PEFT layout), the demo config it used and its own timings into `out`."""
    import torch
    import yaml
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from loratune.data import load_datasets
    from loratune.precision import resolve_precision
    from loratune.pretrained import load_model
    from loratune.train import demo_config
    from loratune.train.session import attention_for

    config = demo_config(out, overrides(steps, eval_records))
    started = time.perf_counter()
    model, tokenizer = load_model(config.model.name, "causal-lm")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precision = resolve_precision("auto", device)
    bf16 = precision == "bf16"
    # the attention the demo resolves its `auto` to here (eager on a CPU in bf16, else SDPA)
    model.set_attn_implementation(attention_for(config.model.attn_implementation, device, precision))
    data = load_datasets(config.data, tokenizer, "causal-lm")  # the same split and the same prompt tokens
    rows = [{"prompt": tokenizer.decode(p), "completion": r} for p, r in zip(data.train.prompts, data.train.references)]
    args = SFTConfig(output_dir=str(out / "trl"), max_steps=steps, per_device_train_batch_size=8, learning_rate=3e-4,
                     warmup_steps=10, lr_scheduler_type="cosine", bf16=bf16, max_length=256,
                     completion_only_loss=True, save_strategy="no", report_to=[], logging_steps=10, seed=0,
                     use_cpu=not cuda, dataloader_num_workers=0, disable_tqdm=True)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora)
    prepared = time.perf_counter()
    trainer.train()
    trained = time.perf_counter()
    trainer.model.save_pretrained(str(out / "adapter"))
    (out / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    (out / "metrics.json").write_text(json.dumps({"train_seconds": trained - prepared, "load_s": prepared - started}))
    return 0


def one_side(library: str, steps: int, eval_records: int, out: Path) -> dict:
    """Train in a fresh process, then score the adapter with `loratune eval` in another."""
    if library == "loratune":
        argv = ["-m", "loratune", "demo", "--output", str(out), "--quiet",
                *(f"--set={o}" for o in overrides(steps, eval_records))]
    else:
        argv = ["-m", "benchmarks.race", "trl-worker", "--steps", str(steps), "--eval-records", str(eval_records),
                "--out", str(out)]
    train = run_child([sys.executable, *argv])
    if train.code != 0:
        raise SystemExit(f"race: the {library} process failed (exit {train.code}):\n{train.output[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    score = run_child([sys.executable, "-m", "loratune", "eval", str(out / "config.yaml"),
                       "--adapter", str(out / "adapter"), "--quiet"])
    found = re.search(r"^accuracy: ([0-9.]+)$", score.output, re.M)
    if score.code != 0 or not found:
        raise SystemExit(f"race: scoring the {library} adapter failed:\n{score.output[-3000:]}")
    return {"library": library, "job_s": train.wall_s, "job_cpu_s": train.cpu_s, "peak_rss_mb": train.peak_rss_mb,
            "train_s": metrics["train_seconds"], "own_accuracy": metrics.get("after", {}).get("accuracy"),
            "common_accuracy": float(found.group(1)), "common_eval_s": score.wall_s}


KEYS = [("job_s", "whole job (one process), s"), ("train_s", "training, s"),
        ("job_cpu_s", "whole job, CPU s (all threads)"), ("peak_rss_mb", "peak RSS, MiB"),
        ("common_accuracy", "accuracy, held-out reviews (`loratune eval` of each adapter)"),
        ("own_accuracy", "accuracy after training (the demo's own evaluation)")]


def markdown(rows: list[dict]) -> str:
    lines = ["| | " + " | ".join(LIBRARIES) + " | loratune / TRL |", "|---" * (len(LIBRARIES) + 2) + "|"]
    for key, label in KEYS:
        medians = []
        for library in LIBRARIES:
            values = [r[key] for r in rows if r["library"] == library and r.get(key) is not None]
            medians.append(statistics.median(values) if values else None)
        cells = [f"{m:.3f}" if m is not None and m < 10 else (f"{m:.0f}" if m is not None else "-") for m in medians]
        ratio = f"{medians[0] / medians[1]:.2f}" if None not in medians and medians[1] else "-"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines) + "\n"


def race(rounds: int, steps: int, eval_records: int) -> int:
    rows = []
    for round_index in range(rounds):
        for library in LIBRARIES if round_index % 2 == 0 else LIBRARIES[::-1]:
            with tempfile.TemporaryDirectory(prefix=f"race-{library}-") as tmp:
                rows.append({"round": round_index, **one_side(library, steps, eval_records, Path(tmp) / "run")})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    stem = "race" if (steps, eval_records) == (100, 300) else "race-short"  # a short run never hides the real one
    table = markdown(rows)
    paths = write_result(stem, {"machine": machine(), "rows": rows}, table)
    print(table + "\nwrote " + ", ".join(map(str, paths)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks race", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="race", choices=["race", "trl-worker"])
    parser.add_argument("--rounds", type=int, default=1, help="alternated rounds (default 1)")
    parser.add_argument("--steps", type=int, default=100, help="training steps (default 100, the demo's)")
    parser.add_argument("--eval-records", type=int, default=300, help="held-out reviews (default 300, the demo's)")
    parser.add_argument("--out", type=Path, help="trl-worker: the folder to write into")
    args = parser.parse_args(argv)
    if args.command == "trl-worker":
        return trl_worker(args.steps, args.eval_records, args.out)
    return race(args.rounds, args.steps, args.eval_records)


if __name__ == "__main__":
    sys.exit(main())
