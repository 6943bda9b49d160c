"""Quantized-base (QLoRA) benchmark: `python -m benchmarks qlora [--part NAME ...]`.

Parts (each training or loading configuration runs in a fresh subprocess, so its peak RSS is its own):
- `roundtrip`: NF4 round-trip error and (de)quantization time of loratune against torchao's NF4 tensor, the
  reference implementation, at the same block sizes, on TinyLlama-shaped random weights.
- `tinyllama`: a TinyLlama-shaped 1.1B model written to disk as bf16 safetensors shards, then loaded and
  trained (LoRA all-linear r=16, batch 1 x 512) with the base in NF4, int8, and dense in the compute dtype:
  peak RSS, load time, step time; the NF4 / dense step-time ratio is the throughput cost of NF4.
- `llama7b`: a Llama-2-7B-shaped model the same way (bf16 shards, about 13.5 GB on disk), NF4, batch 1 x 256.
- `smollm2`: loss of the real SmolLM2-135M-Instruct on movie-review text, fp32 base against NF4 and int8.
- `sentiment`: minilm-l6 LoRA (r=8 on query/value, head trained) on movie-sentiment, fp32 base against NF4,
  with the quality benchmark's data, split and training loop.
Every part also runs loratune's memory estimate for the same configuration, next to the measured peak.
Results: benchmarks/results/qlora.{json,md} and the "Quantized base" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.qlora_report import PARTS, write_qlora

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"
SHAPES: dict[str, dict[str, int]] = {
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "quick": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000),
}
SHARD_BYTES = 2 * 10**9


def model_dir() -> Path:
    """Where the generated models live between runs (they take minutes to write): $LORATUNE_BENCH_MODELS."""
    default = Path(os.environ.get("LORATUNE_CACHE", Path.home() / ".cache" / "loratune")) / "bench-models"
    return Path(os.environ.get("LORATUNE_BENCH_MODELS", default))


def peak_rss_gb() -> float:
    """This process's peak resident memory. From /proc's VmHWM where there is one: `ru_maxrss` of a child
    starts at the parent's resident size at fork (Linux keeps it across exec), which is not the child's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


# --- generated models on disk -----------------------------------------------------------------------------
def write_model(shape: str) -> Path:
    """A Llama-shaped model with random bf16 weights (std 0.02, norms 1), written shard by shard so that
    no more than one shard is ever in memory. Reused when already complete."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = model_dir() / shape
    if (folder / "complete").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, tie_word_embeddings=False)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size, index = 0, 0

    def flush() -> None:
        nonlocal shard, size, index
        name = f"model-{index:05d}.safetensors"
        save_file(shard, str(folder / (name + ".tmp")), metadata={"format": "pt"})
        os.replace(folder / (name + ".tmp"), folder / name)
        weight_map.update(dict.fromkeys(shard, name))
        shard, size, index = {}, 0, index + 1

    for key, meta in skeleton.state_dict().items():
        if key.endswith("norm.weight"):
            tensor = torch.ones(meta.shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(meta.shape, generator=generator) * 0.02).to(torch.bfloat16)
        shard[key] = tensor
        size += tensor.numel() * 2
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    index_json = {"metadata": {"total_size": sum(t.numel() * 2 for t in skeleton.state_dict().values())},
                  "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=1))
    config.save_pretrained(folder)
    _write_tokenizer(folder)
    (folder / "complete").write_text("ok\n")
    return folder


def _write_tokenizer(folder: Path) -> None:
    """A word-level tokenizer: the benchmark feeds random token ids, but the loader wants a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)


# --- one configuration, in a child process ---------------------------------------------------------------
def train_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the model as `loratune train` would (streaming when quantized), add LoRA, time training steps."""
    from loratune import LoraConfig, add_adapter
    from loratune.precision import base_dtype, resolve_precision
    from loratune.pretrained import load_model
    from loratune.quant.allocator import return_large_blocks
    from loratune.train.run_config import DEFAULT_LOSS_CHUNK
    from loratune.train.step import batch_loss

    torch.manual_seed(0)
    return_large_blocks()  # quantized loads do this; the dense baseline too, so the ratio compares storage only
    precision = resolve_precision("auto", torch.device("cpu"))
    quantized = spec["quantize"] != "none"
    start = time.perf_counter()
    model, _ = load_model(spec["folder"], "causal-lm", dtype=base_dtype("auto", precision), quantize=spec["quantize"])
    load_s = time.perf_counter() - start
    load_peak = peak_rss_gb()
    add_adapter(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                  task_type="CAUSAL_LM"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(4, vocab, (spec["steps"] + spec["warmup"], 1, spec["seq_len"]),
                        generator=torch.Generator().manual_seed(1))
    times, losses = [], []
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    for step in range(spec["warmup"] + spec["steps"]):
        batch = {"input_ids": ids[step], "attention_mask": torch.ones_like(ids[step]), "labels": ids[step]}
        began = time.perf_counter()
        with autocast:
            loss, _, _ = batch_loss(model, batch, "causal-lm", DEFAULT_LOSS_CHUNK)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= spec["warmup"]:
            times.append(time.perf_counter() - began)
        losses.append(loss.item())
        print(f"[qlora] {spec['shape']} {spec['quantize']} step {step}: {time.perf_counter() - began:.1f} s, "
              f"loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    return {"precision": precision, "load_s": load_s, "load_peak_rss_gb": load_peak, "peak_rss_gb": peak_rss_gb(),
            "step_s_median": statistics.median(times), "step_s_min": min(times), "step_s_max": max(times),
            "first_loss": losses[0], "quantized": quantized,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory(prefix="loratune-qlora-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-m", "benchmarks.qlora", "worker", str(spec_path), str(out_path)],
                              cwd=REPO_ROOT, env=env, stderr=None, stdout=subprocess.DEVNULL)
        if proc.returncode != 0 or not out_path.is_file():
            return {"status": "failed", "reason": f"exit code {proc.returncode}"}
        return {"status": "ok", **json.loads(out_path.read_text())}


def estimate_gb(folder: Path, quantize: str, seq_len: int) -> dict[str, float]:
    """loratune's own memory estimate for the same run, to set beside the measurement."""
    from loratune.train.memory import estimate_memory
    from loratune.train.run_config import DEFAULT_LOSS_CHUNK, validate_config

    config = validate_config({
        "model": {"name": str(folder), "quantize": quantize},
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
        "data": {"train": "movie-sentiment", "max_length": seq_len},
        "train": {"batch_size": 1, "gradient_checkpointing": True, "loss_chunk_tokens": DEFAULT_LOSS_CHUNK},
    }, "qlora benchmark")
    estimate = estimate_memory(config)
    return {"estimated_load_gb": estimate.loading / 1e9, "estimated_train_gb": estimate.training / 1e9}


def model_part(shape: str, formats: tuple[str, ...], seq_len: int, steps: int, warmup: int) -> list[dict[str, Any]]:
    began = time.perf_counter()
    folder = write_model(shape)
    print(f"[qlora] {shape} on disk at {folder} ({time.perf_counter() - began:.0f} s)", file=sys.stderr, flush=True)
    rows = []
    for quantize in formats:
        spec = {"folder": str(folder), "shape": shape, "quantize": quantize, "seq_len": seq_len,
                "steps": steps, "warmup": warmup}
        row = {"part": shape, "quantize": quantize, "seq_len": seq_len, **run_child(spec),
               **estimate_gb(folder, quantize, seq_len)}
        rows.append(row)
        print(f"[qlora] {json.dumps(row)}", file=sys.stderr, flush=True)
    return rows


# --- accuracy parts -------------------------------------------------------------------------------------
def roundtrip_part(quick: bool) -> list[dict[str, Any]]:
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    from loratune.quant import dequantize, quantize

    generator = torch.Generator().manual_seed(0)
    shapes = [(256, 512)] if quick else [(2048, 2048), (5632, 2048), (2048, 5632)]
    rows = []
    for shape in shapes:
        weight = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        reference = weight.float()
        ours_q, ours_q_s = _timed(lambda w=weight: quantize(w, "nf4", double_quant=True))
        ours_d, ours_d_s = _timed(lambda q=ours_q: dequantize(q, torch.bfloat16))
        ao_q, ao_q_s = _timed(lambda w=weight: to_nf4(w, 64, 256))
        ao_d, ao_d_s = _timed(lambda q=ao_q: q.get_original_weight())
        rows.append({"part": "roundtrip", "shape": list(shape),
                     "loratune_mean_abs_error": (ours_d.float() - reference).abs().mean().item(),
                     "torchao_mean_abs_error": (ao_d.float() - reference).abs().mean().item(),
                     "loratune_quantize_s": ours_q_s, "torchao_quantize_s": ao_q_s,
                     "loratune_dequantize_ms": ours_d_s * 1e3, "torchao_dequantize_ms": ao_d_s * 1e3,
                     "loratune_bytes_per_weight": ours_q.nbytes() / weight.numel()})
    return rows


def _timed(fn: Any, repeats: int = 5) -> tuple[Any, float]:
    result = fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - began)
    return result, statistics.median(times)


def smollm2_part(quick: bool) -> list[dict[str, Any]]:
    """Mean next-token loss of SmolLM2 on movie-review text with the base in fp32, NF4 and int8, and NF4 with
    a LoftQ-initialised adapter (all-linear r=16, 4 iterations): what that adapter recovers at step 0."""
    from loratune import LoraConfig, add_adapter
    from loratune.data import DataConfig, load_datasets
    from loratune.pretrained import load_model
    from loratune.quant import quantize_model

    cfg = DataConfig(train="movie-sentiment", format="text", text_field="text", max_length=256, seed=0,
                     max_train_records=16 if quick else 400, validation_fraction=0.0)
    rows, base_loss = [], None
    for label in ("none", "nf4", "int8", "nf4+loftq"):
        quantize, report = label.split("+")[0], None
        model, tokenizer = load_model("smollm2-135m-instruct", "causal-lm",
                                      quantize="none" if label == "nf4+loftq" else quantize)
        if label == "nf4+loftq":
            add_adapter(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
            report = quantize_model(model, "nf4", loftq_iterations=4)
        data = load_datasets(cfg, tokenizer, "causal-lm")
        loss, tokens = _mean_loss(model, data.train_examples, tokenizer.pad_token_id)
        base_loss = loss if quantize == "none" else base_loss
        rows.append({"part": "smollm2", "quantize": label, "loss": loss, "tokens": tokens,
                     "relative_difference": abs(loss - base_loss) / base_loss,
                     "weight_error": report and report.relative_error,
                     "weight_error_without_loftq": report and report.relative_error_without_loftq})
    return rows


def _mean_loss(model: Any, examples: list[dict], pad_id: int) -> tuple[float, int]:
    from loratune.batching import collate
    from loratune.train.step import batch_loss

    total = weight = 0.0
    with torch.no_grad():
        for start in range(0, len(examples), 8):
            loss, _, count = batch_loss(model, collate(examples[start:start + 8], pad_id, "causal-lm"), "causal-lm")
            total, weight = total + loss.item() * count, weight + count
    return total / weight, int(weight)


def sentiment_part(quick: bool) -> list[dict[str, Any]]:
    """minilm-l6 LoRA r=8 on movie-sentiment with the base in fp32 and in NF4: held-out accuracy."""
    from benchmarks.quality import QualityOptions, accuracy, build, load_data, train

    opts = QualityOptions(epochs=1, quick=quick, max_train_records=128 if quick else None,
                          max_eval_records=64 if quick else None)
    data, label_names, tokenizer = load_data(opts)
    rows = []
    for quantize in ("none", "nf4"):
        model = build("lora", 8, label_names, opts, quantize=quantize)
        seconds = train(model, data, tokenizer.pad_token_id, opts.lr_lora, opts)
        correct = accuracy(model, data, tokenizer.pad_token_id)
        rows.append({"part": "sentiment", "quantize": quantize, "accuracy": correct, "train_s": seconds,
                     "train_examples": len(data.train), "eval_examples": len(data.eval)})
        print(f"[qlora] {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    return rows


# --- driver ------------------------------------------------------------------------------------------------
def run_part(part: str, quick: bool) -> list[dict[str, Any]]:
    if part == "roundtrip":
        return roundtrip_part(quick)
    if part == "tinyllama":
        shape = "quick" if quick else "tinyllama-1.1b"
        return model_part(shape, ("nf4", "int8", "none"), 64 if quick else 512, 5 if quick else 3, 1)
    if part == "llama7b":
        shape = "quick" if quick else "llama2-7b"
        return model_part(shape, ("nf4",), 64 if quick else 256, 5 if quick else 2, 1)
    if part == "smollm2":
        return smollm2_part(quick)
    return sentiment_part(quick)


def run_qlora(parts: list[str], quick: bool) -> int:
    """Run the parts in order; each one's rows replace that part's earlier rows in the results file."""
    import transformers

    from benchmarks.runner import cpu_model

    failed = False
    for part in parts:
        began = time.perf_counter()
        rows = run_part(part, quick)
        meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "command": "python -m benchmarks qlora " + " ".join(sys.argv[2:]), "quick": quick,
                "torch": torch.__version__, "transformers": transformers.__version__, "cpu": cpu_model(),
                "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                "wall_s": round(time.perf_counter() - began, 1)}
        paths = write_qlora(part, {"meta": meta, "rows": rows}, quick)
        print(f"[qlora] {part} done: wrote " + ", ".join(str(p) for p in paths), file=sys.stderr, flush=True)
        failed = failed or any(r.get("status", "ok") != "ok" for r in rows)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        spec = json.loads(Path(argv[1]).read_text())
        Path(argv[2]).write_text(json.dumps(train_worker(spec)))
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks qlora")
    parser.add_argument("--part", action="append", choices=PARTS, help="run only this part (repeatable)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and data: a smoke test")
    args = parser.parse_args(argv)
    return run_qlora(args.part or list(PARTS), args.quick)


if __name__ == "__main__":
    sys.exit(main())
