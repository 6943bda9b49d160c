"""`python -m benchmarks scale`: training-step tokens/s and peak RSS of Llama-shaped random models from 135M to
7B, with a plain base where the weights fit in memory and NF4 / int8 bases always.

Each run is a child process (its own peak RSS): the model is built with random weights layer by layer (a
quantized layer never exists in full precision), gets a LoRA adapter (r=16, all-linear) and trains a few
steps of batch 1 x `--tokens` with AdamW, as `loratune train` does (same loss, autocast, checkpointing
decision and, for a quantized base under glibc, the allocator setting `load_model` makes: `return_large_blocks`;
under `python -m benchmarks`, the malloc the `loratune` program takes, recorded with the result). Useful
work is 4 FLOPs per frozen linear weight per token (forward and input gradient), shown as a percentage of the
fp32, bf16 and int8 product rates measured in the same run at 512 x 2048 by 2048 x 5632.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import proc_status, run_child

# Llama-shaped configs: SmolLM2-135M and -360M, TinyLlama-1.1B, Llama-3.2-3B, Llama-2-7B
SIZES = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True),
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
}
RATE_SHAPE = (512, 2048, 5632)
RATE_KINDS = ("fp32", "bf16", "int8")
GB = 1e9


def build_model(shape: dict, quantize: str, dtype):
    """Random Llama of `shape` in `dtype` (the frozen weights' dtype `loratune train` picks), its block linears
    stored in `quantize` (built one layer at a time)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loratune.core.adapters import set_module
    from loratune.quant.convert import quantizable_layers
    from loratune.quant.linear import QuantLinear

    config = LlamaConfig(**shape, max_position_embeddings=4096, torch_dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    if quantize != "none":
        for path, layer in quantizable_layers(model).items():
            weight = torch.randn(layer.weight.shape, generator=gen, dtype=torch.bfloat16).mul_(0.02)
            set_module(model, path, QuantLinear.from_weight(weight, None, quantize, dtype=dtype))
    for module in model.modules():
        if any(t.is_meta for t in module.parameters(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
            for param in module.parameters(recurse=False):
                param.requires_grad_(False)
                param.data = param.data.to(dtype)
                param.data.normal_(0, 0.02, generator=gen) if param.dim() > 1 else param.data.fill_(1.0)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its buffer was made on meta
    model.tie_weights()
    return model


def prepared(spec: dict, quantize: str):
    """(model with a LoRA adapter, its optimizer) for one base, as `loratune train` sets them up."""
    import torch

    from loratune.core.adapters import add_adapter
    from loratune.core.lora_config import LoraConfig
    from loratune.precision import base_dtype, cpu_choice
    from loratune.quant.linear import set_base_compute
    from loratune.quant.widen import widen_frozen_base
    from loratune.train.optim import build_optimizer
    from loratune.train.saved_activations import save_less

    # the random weights stand for a bf16 checkpoint: trained in fp32 where fp32 weights would not fit, a plain
    # base keeps its linear weights in bf16 and the rest turns fp32, as `loratune train` does (`quant.widen`)
    widened = spec.get("widened", False)
    model = build_model(spec["shape"], quantize, base_dtype("auto", spec["precision"], torch.bfloat16 if widened
                                                            else None))
    if widened:
        widen_frozen_base(model)
    int8_base = cpu_choice().get("int8_base") if quantize == "int8" else None
    if int8_base:
        set_base_compute(model, int8_base)
    save_less(model)
    add_adapter(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                  task_type="CAUSAL_LM"))
    model.train()
    if spec["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, build_optimizer(model, 1e-4, 0.0, 1.0)


def timed_step(model, optimizer, batch: dict, precision: str) -> tuple[float, float]:
    """(seconds, loss) of one training step."""
    import torch

    from loratune.train.step import batch_loss

    begin = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss, _, _ = batch_loss(model, batch, "causal-lm", 1024)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - begin, loss.item()


def token_batch(spec: dict) -> dict:
    import torch

    ids = torch.randint(0, spec["shape"]["vocab_size"], (1, spec["tokens"]), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def child(spec: dict) -> dict:
    """One run: build, adapt, train `steps` steps; tokens/s of steps 2.. and the resident memory before and
    after building (the peak is the runner's count, `run_spec`). With `spec["bases"]`, every base in one
    process instead, their steps alternating, so that each ratio to the plain base is read at the same CPU
    speed (this CPU's product rate moves by 2-3x within minutes); no memory figures then."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before the baseline is read)

    from loratune.allocator import release_free_memory, return_large_blocks
    from loratune.precision import cpu_choice

    torch.set_num_threads(spec["threads"])
    bases = spec.get("bases") or [spec["quantize"]]
    # the CPU probe may run here (no cached rates yet): before the baseline, so its tensors are not counted
    cpu_choice()
    if "bases" not in spec and spec["quantize"] != "none":
        return_large_blocks()  # as `load_model` does for a quantized base (memory before speed); interleaved
        # bases share one process, so all of them run without it there, the plain base not handicapped
    release_free_memory()
    start_rss = proc_status("VmRSS")
    runs = {base: prepared(spec, base) for base in bases}
    batch = token_batch(spec)
    release_free_memory()
    built_rss, times = proc_status("VmRSS"), {base: [] for base in bases}
    for step in range(spec["steps"]):
        for base in bases[step % len(bases):] + bases[:step % len(bases)]:  # each base first in turn
            seconds, loss = timed_step(*runs[base], batch, spec["precision"])
            times[base].append(seconds)
    results = {}
    for base in bases:
        timed = times[base][1:] or times[base]
        median = statistics.median(timed)
        results[base] = {"tokens": spec["tokens"], "step_s": median, "step_range": [min(timed), max(timed)],
                         "tokens_per_s": spec["tokens"] / median}
    if "bases" in spec:
        return {"interleaved": results}
    return {**results[bases[0]], "start_rss": start_rss, "built_rss": built_rss, "loss": loss}


def run_spec(spec: dict, timeout: float) -> dict:
    """`child(spec)` in a fresh process (`common.run_child`), with that process's own peak RSS, or {"error": why}."""
    done = run_child([sys.executable, "-m", "benchmarks.scale", "--child", json.dumps(spec)], timeout)
    lines = done.output.strip().splitlines()
    if done.code == -9 and done.wall_s >= timeout:
        return {"error": f"timed out after {timeout:.0f} s"}
    results = [line for line in lines if line.startswith("{")]
    if done.code or not results:
        return {"error": (lines or [f"exit {done.code}"])[-1]}
    return {**json.loads(results[-1]), "peak_rss": int(done.peak_rss_mb * 2**20)}


def estimate(shape: dict, quantize: str, tokens: int, checkpointing: bool | None, folder: Path):
    """loratune's estimate for this run (a folder holding only the model's config.json stands for the model)."""
    from transformers import LlamaConfig

    from loratune.train.memory import estimate_memory
    from loratune.train.run_config import RunConfig

    LlamaConfig(**shape, max_position_embeddings=4096, torch_dtype="bfloat16").save_pretrained(folder)
    config = RunConfig.model_validate({
        "model": {"name": str(folder), "task": "causal-lm", "quantize": quantize},
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": "movie-sentiment", "max_length": tokens},
        "train": {"batch_size": 1, "gradient_checkpointing": checkpointing}})
    return estimate_memory(config)


def frozen_linear_weights(shape: dict) -> int:
    """Weights of the frozen linear layers a token passes through: the blocks' seven and the output head."""
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return layers * (2 * h * h + 2 * h * kv + 3 * h * i) + h * shape["vocab_size"]


def machine_precision() -> str:
    """The precision `precision: auto` resolves to on this CPU (the probe's choice): what a run would use."""
    import torch

    from loratune.precision import resolve_precision

    return resolve_precision("auto", torch.device("cpu"))


def product_rates(threads: int) -> dict[str, float]:
    """GOP/s of fp32, bf16 (where the CPU has it natively; emulated, a product takes seconds) and int8
    (`torch._int_mm`) products at RATE_SHAPE with the runs' threads."""
    from loratune.precision import cpu_has_bf16, measure_rates

    rates = measure_rates(cpu_has_bf16(), RATE_SHAPE, repeats=3, threads=threads, layers=False)
    return {k: rates[k] for k in RATE_KINDS if k in rates}


def run_all(args: argparse.Namespace) -> list[dict]:
    from loratune.train.memory import machine_memory

    available, rows = machine_memory() or 0, []
    precision = machine_precision()
    rates = product_rates(args.threads)
    print("product rates (GOP/s): " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()), file=sys.stderr)
    for size in args.sizes:
        shape, plain = SIZES[size], None
        for quantize in args.bases:
            with tempfile.TemporaryDirectory() as folder:
                est = estimate(shape, quantize, args.tokens, None, Path(folder))
            if quantize == "none" and est.training > 0.85 * available:
                rows.append({"size": size, "quantize": quantize, "error": f"not run: estimate {est.training / GB:.1f}"
                             f" GB of {available / GB:.1f} GB"})
                continue
            spec = {"shape": shape, "quantize": quantize, "tokens": args.tokens, "steps": args.steps,
                    "precision": precision, "threads": args.threads,
                    "checkpointing": "on" in est.setting.split(",")[-1], "widened": "linear weights" in est.setting}
            row = {"size": size, "quantize": quantize, "checkpointing": spec["checkpointing"],
                   "estimate": est.training - est.runtime, **run_spec(spec, args.timeout)}
            if "error" not in row:
                row["gflops"] = 4 * frozen_linear_weights(shape) * row["tokens_per_s"] / 1e9
                row.update({f"pct_{k}": 100 * row["gflops"] / v for k, v in rates.items()})
                plain = row["tokens_per_s"] if quantize == "none" else plain
                row["vs_plain"] = row["tokens_per_s"] / plain if plain else None
            rows.append(row)
            print(table_line(row), file=sys.stderr, flush=True)
        if args.interleave:
            rows.append(interleaved(size, rows, args, available, precision))
            print(interleaved_line(rows[-1]), file=sys.stderr, flush=True)
    rates_after = product_rates(args.threads)
    print("product rates after (GOP/s): " + ", ".join(f"{k} {v:.0f}" for k, v in rates_after.items()), file=sys.stderr)
    return rows


def interleaved(size: str, rows: list[dict], args: argparse.Namespace, available: int, precision: str) -> dict:
    """The plain, NF4 and int8 bases of `size` in one child, steps alternating (`child`); where the three do not
    fit at once, the plain base with each quantized one in turn. {"size", "pairs": [child results]}."""
    runs = {r["quantize"]: r for r in rows if r["size"] == size}
    if set(runs) != {"none", "nf4", "int8"} or any("error" in r or r["checkpointing"] for r in runs.values()):
        return {"size": size, "pairs": []}  # a base that did not run, or needed checkpointing to fit
    need = {base: r["peak_rss"] - r["start_rss"] for base, r in runs.items()}
    fits = sum(need.values()) <= 0.85 * available
    groups = [["none", "nf4", "int8"]] if fits else [["none", q] for q in ("nf4", "int8")
                                                      if need["none"] + need[q] <= 0.85 * available]
    pairs = []
    for bases in groups:
        spec = {"shape": SIZES[size], "bases": bases, "tokens": args.tokens, "steps": args.steps + 1,
                "precision": precision, "threads": args.threads, "checkpointing": False}
        result = run_spec(spec, args.timeout)
        pairs.append(result.get("interleaved") or {"error": result.get("error", "no result")})
    return {"size": size, "pairs": pairs}


def interleaved_line(row: dict) -> str:
    """Plain tokens/s (one figure per child), then each quantized base with its ratio to its own child's plain."""
    if not row["pairs"]:
        return f"| {row['size']} | not run (no plain base beside a quantized one without checkpointing) | | |"
    if any("error" in runs for runs in row["pairs"]):
        return f"| {row['size']} | " + "; ".join(runs.get("error", "ran") for runs in row["pairs"]) + " | | |"
    plain = " / ".join(f"{runs['none']['tokens_per_s']:.1f}" for runs in row["pairs"])
    cells = {}
    for runs in row["pairs"]:
        for base in set(runs) - {"none"}:
            rate = runs[base]["tokens_per_s"]
            cells[base] = f"{rate:.1f} ({rate / runs['none']['tokens_per_s']:.2f}x)"
    return f"| {row['size']} | {plain} | {cells.get('nf4', '-')} | {cells.get('int8', '-')} |"


INTERLEAVED_HEADER = ("| model | plain tokens/s | NF4 tokens/s (vs plain) | int8 tokens/s (vs plain) |\n"
                      "|---|---|---|---|")
HEADER = ("| model | base | ckpt | tokens/s (steps 2.., range) | vs plain | useful GFLOP/s | % fp32 / bf16 / int8 rate "
          "| peak RSS GB | training increment GB: measured / estimate |\n|---|---|---|---|---|---|---|---|---|")


def table_line(row: dict) -> str:
    if "pairs" in row:
        return interleaved_line(row)
    if "error" in row:
        return f"| {row['size']} | {row['quantize']} | | {row['error']} | | | | | |"
    lo, hi = (row["tokens"] / t for t in reversed(row["step_range"])) if "tokens" in row else (0, 0)
    vs = f"{row['vs_plain']:.2f}x" if row.get("vs_plain") else "-"
    inc = (row["peak_rss"] - row["start_rss"]) / GB
    return (f"| {row['size']} | {row['quantize']} | {'on' if row['checkpointing'] else 'off'} | "
            f"{row['tokens_per_s']:.1f} ({lo:.1f}-{hi:.1f}) | {vs} | {row['gflops']:.1f} | "
            f"{' / '.join(f'{row[k]:.1f}' if k in row else '-' for k in (f'pct_{r}' for r in RATE_KINDS))}% | "
            f"{row['peak_rss'] / GB:.2f} | "
            f"{inc:.2f} / {row['estimate'] / GB:.2f} ({100 * (row['estimate'] / GB / inc - 1):+.0f}%) |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["135m", "360m", "1.1b"])
    parser.add_argument("--tokens", type=int, default=512, help="tokens per step (batch 1; default 512)")
    parser.add_argument("--steps", type=int, default=4, help="steps per run; the first is not timed (default 4)")
    parser.add_argument("--bases", nargs="+", choices=["none", "nf4", "int8"], default=["none", "nf4", "int8"],
                        help="frozen bases to run: plain (none), NF4, int8 (default: all three)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run (default 2)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run before it is abandoned")
    parser.add_argument("--interleave", action="store_true",
                        help="also run each size's bases in one process, steps alternating (the plain base with each "
                             "quantized one where the three do not fit), for ratios read at one CPU speed")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    rows = run_all(args)
    print(HEADER + "\n" + "\n".join(table_line(r) for r in rows if "pairs" not in r))
    if args.interleave:
        print("\nSteps alternating in one process:\n\n" + INTERLEAVED_HEADER + "\n"
              + "\n".join(interleaved_line(r) for r in rows if "pairs" in r))
    failed = [r for r in rows if "error" in r and not r["error"].startswith("not run")]
    failed += [r for r in rows if any("error" in runs for runs in r.get("pairs", []))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
