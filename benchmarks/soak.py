"""Crash-safety soak: SIGKILL a real `loratune train` process 20 times at chosen and random moments, resume it
each time, and require the final adapter to equal an uninterrupted run's bit for bit; then fill a small
tmpfs (or, where mounting is not allowed, cap the file size) under a run and require a one-line error with the
previous checkpoint and adapter intact.

Run `make soak` (or `python -m benchmarks.soak --kills 20`); results go to benchmarks/results/soak-latest.json.
Kill moments, in this order: during start-up, at random moments of training, in the middle of checkpoint writes
(a checkpoint every step; the kill comes when the temporary `.step-N.*` folder appears) and in the middle of the
final adapter write (when `adapter/.adapter_model.safetensors.*.tmp` appears). Whether a kill really landed
inside a write is read from the temporary files it left, and reported.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from benchmarks.common import child_env, machine, write_result

ROOT = Path(__file__).resolve().parents[1]
STEPS = 90


def _tiny_model(folder: Path) -> str:
    """A GPT-2 big enough that a checkpoint write takes a measurable time (about 10 MB with the optimizer)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import VOCAB, make_tokenizer  # the tests' word-level tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(VOCAB), n_positions=64, n_embd=256, n_layer=4, n_head=4, bos_token_id=1,
                        eos_token_id=2, pad_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return str(folder)


def _config(work: Path, model: str, out: Path, **train) -> Path:
    rows = [{"text": f"the {w} movie", "label": label} for w, label in
            [("good", "positive"), ("bad", "negative"), ("great", "positive"), ("awful", "negative")]] * 8
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = {
        "model": {"name": model, "task": "causal-lm"},
        "lora": {"r": 64, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["c_attn", "c_fc", "c_proj"]},
        "data": {"train": str(data), "format": "classification", "prompt_template": "{text} sentiment :",
                 "completion_template": "{label}", "validation_fraction": 0.25, "max_length": 32},
        "train": {"max_steps": STEPS, "batch_size": 4, "learning_rate": 0.01, "precision": "fp32", "seed": 0,
                  "eval_batch_size": 8, "generation_eval": False, "num_samples": 0, "checkpoint_every": 1,
                  "keep_checkpoints": 2, **train},
        "output_dir": str(out),
    }
    path = work / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _start(config: Path, resume: bool, env: dict[str, str], **popen) -> subprocess.Popen:
    argv = [sys.executable, "-m", "loratune.cli", "train", str(config), "--quiet"] + (["--resume"] if resume else [])
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


def _started(out: Path) -> bool:
    """Whether the killed run got as far as writing its config: then, as a user would, resume it (before its
    first checkpoint, loratune starts it again from step 0)."""
    return (out / "config.yaml").is_file()


def _has_checkpoint(out: Path) -> bool:
    folder = out / "checkpoints"
    return folder.is_dir() and any(p.name.startswith("step-") and (p / "checkpoint.json").is_file()
                                   for p in folder.iterdir())


def _temporaries(out: Path) -> list[str]:
    found = []
    for sub in ("checkpoints", "adapter"):
        folder = out / sub
        if folder.is_dir():
            found += [f"{sub}/{p.name}" for p in folder.iterdir() if p.name.startswith(".")]
    return found


def _metrics_changed_since(out: Path, since_ns: int) -> int:
    """The modification time of `metrics.jsonl` when newer than `since_ns`, else 0."""
    try:
        mtime = (out / "metrics.jsonl").stat().st_mtime_ns
    except FileNotFoundError:
        return 0
    return mtime if mtime > since_ns else 0


def _wait_for(process: subprocess.Popen, ready, timeout: float) -> bool:
    """Poll (about every 0.2 ms) until `ready()` or the process ends; True when ready while still running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if ready():
            return True
        time.sleep(0.0002)
    return False


def _kill_once(kind: str, config: Path, out: Path, env: dict[str, str], rng: random.Random) -> dict:
    resume = _started(out)
    before = set(_temporaries(out))
    started_ns = time.time_ns()
    process = _start(config, resume, env)
    started = time.monotonic()
    if kind == "startup":
        ready = _wait_for(process, lambda: time.monotonic() - started > rng.uniform(0.5, 4.0), 120)
    elif kind == "random":
        # the run rewrites metrics.jsonl when it opens, then appends a line per step: wait for that first step
        ready = _wait_for(process, lambda: _metrics_changed_since(out, started_ns), 300)
        opened = _metrics_changed_since(out, started_ns)
        ready = ready and _wait_for(process, lambda: _metrics_changed_since(out, opened), 300)
        until = time.monotonic() + rng.uniform(0, 1.5)
        ready = ready and _wait_for(process, lambda: time.monotonic() > until, 10)
    elif kind == "checkpoint":
        ready = _wait_for(process, lambda: any(t.startswith("checkpoints/.step-") for t in
                                               set(_temporaries(out)) - before), 300)
    else:  # the final adapter write
        ready = _wait_for(process, lambda: any(t.startswith("adapter/.") for t in set(_temporaries(out)) - before),
                          300)
    process.send_signal(signal.SIGKILL)
    _, err = process.communicate()
    left = sorted(set(_temporaries(out)) - before)
    return {"kind": kind, "resumed": resume, "seconds": round(time.monotonic() - started, 2),
            "killed_while_running": ready and process.returncode == -signal.SIGKILL,
            "inside_write": bool(left), "temporaries_left": left,
            # a run that ended by itself before its moment came (exit 0) is not an error, only not a kill
            "error": None if process.returncode in (-signal.SIGKILL, 0) else err.strip()[-500:]}


def kill_soak(work: Path, model: str, kills: int, seed: int, env: dict[str, str]) -> dict:
    rng = random.Random(seed)
    reference_config = _config(work, model, work / "reference")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "loratune.cli", "train", str(reference_config), "--quiet"],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"the uninterrupted run failed: {done.stderr}")
    reference_seconds = time.monotonic() - started

    config = _config(work, model, work / "killed")
    plan = ["startup"] * 2 + ["random"] * 6 + ["checkpoint"] * 8
    rng.shuffle(plan)
    plan = (plan + ["final"] * 4)[:kills] if kills >= 4 else plan[:kills]
    records = []
    for number, kind in enumerate(plan, start=1):
        records.append(_kill_once(kind, config, work / "killed", env, rng))
        print(f"kill {number:2d}/{len(plan)}: {json.dumps(records[-1])}", flush=True)
    finish = subprocess.run([sys.executable, "-m", "loratune.cli", "train", str(config), "--quiet"]
                            + (["--resume"] if _started(work / "killed") else []),
                            capture_output=True, text=True, env=env)
    expected = work / "reference" / "adapter" / "adapter_model.safetensors"
    final = work / "killed" / "adapter" / "adapter_model.safetensors"
    identical = finish.returncode == 0 and final.read_bytes() == expected.read_bytes()
    a, b = load_file(expected), (load_file(final) if final.is_file() else {})
    tensors_equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return {"kills": len(records), "killed_while_running": sum(r["killed_while_running"] for r in records),
            "inside_writes": sum(r["inside_write"] for r in records),
            "resume_errors": [r["error"] for r in records if r["error"]],
            "final_run_exit": finish.returncode, "final_run_stderr": finish.stderr.strip()[-500:],
            "adapter_bytes_identical": identical, "adapter_tensors_equal": tensors_equal,
            "temporaries_left_at_end": _temporaries(work / "killed"),
            "reference_run_seconds": round(reference_seconds, 1), "records": records}


# --- a full disk ----------------------------------------------------------------------------------------------
def _mount_tmpfs(folder: Path, size_mb: int) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    return done.returncode == 0


def _fill(folder: Path, leave_bytes: int) -> None:
    """Write a filler file until only about `leave_bytes` are free."""
    free = shutil.disk_usage(folder).free
    with open(folder / "filler", "wb") as handle:
        handle.write(b"\0" * max(0, free - leave_bytes))


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and (p.parent.name == "adapter" or "checkpoints" in p.parts)}


def full_disk(work: Path, model: str, env: dict[str, str]) -> dict:
    """A finished run, then a full disk: resuming it re-writes the final adapter (at max_steps); and a run
    stopped halfway, then a full disk: resuming writes a checkpoint. Each must fail with one line and leave
    what was there."""
    disk = work / "disk"
    mounted = _mount_tmpfs(disk, 160)
    results = {"tmpfs": mounted, "cases": []}
    try:
        for name, max_steps in (("final-adapter-write", 4), ("checkpoint-write", 8)):
            out = disk / name
            config = _config(work, model, out, max_steps=max_steps)
            first = _start(config, False, env)
            if name == "checkpoint-write":  # stop it once the step-4 checkpoint is complete
                step_4 = out / "checkpoints" / "step-4" / "checkpoint.json"
                _wait_for(first, step_4.is_file, 600)
                first.send_signal(signal.SIGKILL)
            first.communicate()
            before = _snapshot(out)
            limit = {}
            if mounted:
                _fill(disk, 64 * 1024)
            else:  # no mount allowed: writes past 64 KiB fail (EFBIG), the closest stand-in for ENOSPC
                limit = {"preexec_fn": _limit_file_size}
            second = _start(config, True, env, **limit)
            _, err = second.communicate()
            # the run killed just before left its lock: taking it over is a warning line of its own
            lines = [line for line in err.splitlines() if line.strip() and not line.startswith("loratune: warning:")]
            after = _snapshot(out)
            results["cases"].append({
                "case": name, "exit": second.returncode, "stderr_lines": len(lines), "stderr": err.strip()[-1500:],
                "one_line": len(lines) == 1 and lines[0].startswith("loratune: error:") and "Traceback" not in err,
                "previous_files_intact": all(after.get(k) == v for k, v in before.items()),
                "files_checked": len(before)})
            (disk / "filler").unlink(missing_ok=True)
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)
    return results


def _limit_file_size() -> None:
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    env = child_env()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="loratune-soak-") as tmp:
        work = Path(tmp)
        model = _tiny_model(work / "model")
        soak = kill_soak(work, model, args.kills, args.seed, env)
        disk = full_disk(work, model, env)
    report = {"machine": machine(), "kill_soak": soak, "full_disk": disk,
              "total_seconds": round(time.monotonic() - started, 1)}
    ok = (soak["adapter_bytes_identical"] and not soak["resume_errors"]
          and all(c["one_line"] and c["previous_files_intact"] for c in disk["cases"]))
    print(f"kills: {soak['kills']} ({soak['killed_while_running']} while running, {soak['inside_writes']} inside "
          f"a write); resume errors: {len(soak['resume_errors'])}; final adapter identical: "
          f"{soak['adapter_bytes_identical']}; full disk ({'tmpfs' if disk['tmpfs'] else 'file-size limit'}): "
          + ", ".join(f"{c['case']}: one line {c['one_line']}, intact {c['previous_files_intact']}"
                      for c in disk["cases"]) + f"; {report['total_seconds']} s")
    print("wrote " + ", ".join(map(str, write_result("soak-latest", report, json.dumps(soak["resume_errors"])))))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
