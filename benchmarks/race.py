"""The race: the demo's whole job (load, train, evaluate) as loratune runs it and as TRL's `SFTTrainer` + PEFT
runs it, each in a fresh process, alternated, on the same split.

    python -m benchmarks race [--rounds 1] [--steps 100]

Both sides train SmolLM2-135M-Instruct on the demo's movie-sentiment split (the examples loratune's data
pipeline makes: chat-templated prompt, label answer, 128 tokens at most), r=8 all-linear, batch 8, lr 3e-4,
10 warm-up steps, cosine, in the precision loratune resolves on the machine for both (bf16 autocast where the
CPU or GPU computes bf16 natively, fp32 where bf16 would be emulated, as on AVX2-only CPUs). Each process
reports its load, training and evaluation seconds, the CPU seconds of its threads (a check on the wall
times when other work shares the machine) and its peak RSS; then the same scoring code (greedy generation
of 6 tokens, `generation_metrics`) measures accuracy on the same 300 held-out reviews for both. loratune's
own evaluation (label scoring, loss) is timed as the demo runs it. TRL and accelerate are the `bench` extra
(`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.runner import cpu_flags, cpu_model

RESULTS = Path(__file__).parent / "results"
LIBRARIES = ("loratune", "trl")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _uses_bf16(device) -> bool:
    """Both libraries compute in the precision loratune's `auto` picks here, so neither is handed an emulated dtype."""
    from loratune.precision import resolve_precision

    return resolve_precision("auto", device) == "bf16"


def _common_accuracy(model, tokenizer, data, device) -> tuple[float, float]:
    """(accuracy, seconds): greedy answers to the held-out prompts, scored as the demo scores generations."""
    import contextlib

    import torch

    from loratune.train.evaluate import generate_texts, generation_metrics

    started = time.perf_counter()
    bf16 = _uses_bf16(device)
    outputs = generate_texts(model, tokenizer, data.eval_prompts, 6, 32, device,
                             lambda: torch.autocast(device.type, dtype=torch.bfloat16) if bf16
                             else contextlib.nullcontext())
    metrics = generation_metrics(outputs, data.eval_references, data.label_names)
    return metrics["accuracy"], time.perf_counter() - started


def run_loratune(steps: int, out: Path, eval_records: int) -> dict:
    from loratune.train import demo_config
    from loratune.train.loop import batch_order, finish, start_run, train_step
    from loratune.train.session import prepare

    config = demo_config(out, [f"train.max_steps={steps}", f"data.max_eval_records={eval_records}"])
    started, cpu_started = time.perf_counter(), time.process_time()
    session = prepare(config, quiet=True)
    loaded = time.perf_counter()
    run = start_run(session, out)  # the demo's evaluation before training
    before, cpu_before = time.perf_counter(), time.process_time()
    session.model.train()
    order = batch_order(session)  # as `loratune demo` orders its batches
    progress = session.progress(total=steps, desc="training")
    while run.state.step < steps:
        train_step(run, order, progress)
    trained, cpu_trained = time.perf_counter(), time.process_time()
    summary = finish(run)  # evaluation after training, adapter and report
    done, cpu_done = time.perf_counter(), time.process_time()
    accuracy, common_s = _common_accuracy(session.model, session.tokenizer, session.data, session.device)
    return {"load_s": loaded - started, "eval_before_s": before - loaded, "train_s": trained - before,
            "eval_after_s": done - trained, "job_s": done - started, "train_cpu_s": cpu_trained - cpu_before,
            "job_cpu_s": cpu_done - cpu_started, "own_accuracy": summary["after"].get("accuracy"),
            "common_accuracy": accuracy, "common_eval_s": common_s, "peak_rss_mb": _peak_rss_mb()}


def run_trl(steps: int, out: Path, eval_records: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from loratune.data import load_datasets
    from loratune.pretrained import load_model
    from loratune.train import demo_config

    config = demo_config(out, [f"data.max_eval_records={eval_records}"])
    started, cpu_started = time.perf_counter(), time.process_time()
    model, tokenizer = load_model(config.model.name, "causal-lm")
    model.set_attn_implementation("eager")  # as the demo does: faster for short sequences on a CPU
    data = load_datasets(config.data, tokenizer, "causal-lm")  # the same split and the same prompt tokens
    rows = [{"prompt": tokenizer.decode(p), "completion": r}
            for p, r in zip(data.train.prompts, data.train.references)]
    loaded = time.perf_counter()
    bf16 = _uses_bf16(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=3e-4,
                     warmup_steps=10, lr_scheduler_type="cosine", bf16=bf16, max_length=256,
                     completion_only_loss=True, save_strategy="no", report_to=[], logging_steps=10, seed=0,
                     use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora)
    prepared, cpu_prepared = time.perf_counter(), time.process_time()
    trainer.train()
    trained, cpu_trained = time.perf_counter(), time.process_time()
    device = next(trainer.model.parameters()).device
    accuracy, common_s = _common_accuracy(trainer.model, tokenizer, data, device)
    cpu_done = time.process_time()
    return {"load_s": loaded - started, "prepare_s": prepared - loaded, "train_s": trained - prepared,
            "eval_after_s": common_s, "job_s": trained - started + common_s, "train_cpu_s": cpu_trained - cpu_prepared,
            "job_cpu_s": cpu_done - cpu_started, "common_accuracy": accuracy,
            "common_eval_s": common_s, "peak_rss_mb": _peak_rss_mb()}


def worker(library: str, steps: int, eval_records: int, result: Path) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        row = (run_loratune if library == "loratune" else run_trl)(steps, Path(tmp) / "run", eval_records)
    row["library"] = library
    result.write_text(json.dumps(row))
    return 0


def _load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def race(rounds: int, steps: int, eval_records: int) -> int:
    rows = []
    for round_index in range(rounds):
        order = LIBRARIES if round_index % 2 == 0 else LIBRARIES[::-1]
        for library in order:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
                result = Path(handle.name)
            load_before = _load_average()
            started = time.perf_counter()
            code = subprocess.call([sys.executable, "-m", "benchmarks.race", "worker", library,
                                    "--steps", str(steps), "--eval-records", str(eval_records),
                                    "--result", str(result)])
            if code != 0:
                print(f"race: the {library} process failed (exit {code})", file=sys.stderr)
                return 1
            row = json.loads(result.read_text())
            result.unlink()
            row.update(round=round_index, process_s=time.perf_counter() - started,
                       load_average_before=load_before, load_average_after=_load_average())
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    command = f"python -m benchmarks race --rounds {rounds} --steps {steps} --eval-records {eval_records}"
    report = {"date": time.strftime("%Y-%m-%d"), "command": command, "cpu": cpu_model(), "cpu_flags": cpu_flags(),
              "rows": rows}
    name = "race" if (steps, eval_records) == (100, 300) else "race-short"  # a short run never hides the real one
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=1))
    table = markdown(rows)
    (RESULTS / f"{name}.md").write_text(f"`{command}`, {report['date']}, {report['cpu']}\n\n{table}")
    print(table)
    return 0


KEYS = [("load_s", "load, s"), ("train_s", "training, s"), ("eval_after_s", "evaluation after training, s"),
        ("job_s", "whole job, s"), ("train_cpu_s", "training, CPU s (all threads)"),
        ("job_cpu_s", "whole job, CPU s (all threads)"), ("peak_rss_mb", "peak RSS, MB"),
        ("common_accuracy", "accuracy (generation, same code), held-out reviews"),
        ("own_accuracy", "accuracy (loratune's label scoring)")]


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks race", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="race", choices=["race", "worker"])
    parser.add_argument("library", nargs="?", choices=LIBRARIES)
    parser.add_argument("--rounds", type=int, default=1, help="alternated rounds (default 1)")
    parser.add_argument("--steps", type=int, default=100, help="training steps (default 100, the demo's)")
    parser.add_argument("--eval-records", type=int, default=300, help="held-out reviews (default 300, the demo's)")
    parser.add_argument("--result", type=Path)
    args = parser.parse_args(argv)
    if args.command == "worker":
        return worker(args.library, args.steps, args.eval_records, args.result)
    return race(args.rounds, args.steps, args.eval_records)


if __name__ == "__main__":
    sys.exit(main())
