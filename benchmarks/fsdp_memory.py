"""`python -m benchmarks.fsdp_memory`: the peak RSS (VmHWM) of every rank of `loratune train` with
`train.distributed: fsdp` and a quantized base, on 1, 2 and 4 processes (gloo on CPU), for a Llama-shaped model
with random bf16 weights (`benchmarks.scale.SIZES`) written once to a folder as safetensors.

Each run is `torchrun --standalone --nproc_per_node N` over this module's `--rank-child`, which runs the real
CLI (`loratune train`) and then writes its own VmHWM: what one rank needed, from importing torch to the last
step. Training is LoRA r=16 on every linear layer of the blocks, batch 1 x `--tokens` tokens, bf16 autocast,
no checkpointing, no evaluation. `--src` measures another checkout's `src` (e.g. the commit before a change).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT, machine, peak_rss_mb, replace_block, run_child, write_result
from benchmarks.scale import SIZES

DOCS_PAGE = ROOT / "docs" / "distributed.md"
WORDS = 500  # the tokenizer's vocabulary: w0 .. w499 after four special tokens


def write_model(folder: Path, shape: dict, seed: int = 0) -> Path:
    """A Llama of `shape` with random bf16 weights (normal, std 0.02; norms 1), one safetensors file per block
    plus one for the rest, and a word-level tokenizer; made once (config.json, written last, marks it done)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=4096, dtype="bfloat16", bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    with torch.device("meta"):
        shapes = {k: tuple(t.shape) for k, t in LlamaForCausalLM(config).state_dict().items()}
    files: dict[str, dict[str, tuple]] = {}
    for key, size in shapes.items():
        part = key.split(".")[2] if key.startswith("model.layers.") else "rest"
        files.setdefault(f"model-{part}.safetensors", {})[key] = size
    folder.mkdir(parents=True, exist_ok=True)
    gen, weight_map = torch.Generator().manual_seed(seed), {}
    for name, members in files.items():
        tensors = {k: (torch.randn(s, generator=gen).mul_(0.02) if len(s) > 1 else torch.ones(s)).to(torch.bfloat16)
                   for k, s in members.items()}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tokenizer().save_pretrained(folder)
    config.save_pretrained(folder)
    return folder


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *(f"w{i}" for i in range(WORDS))])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def run_config(model: Path, data: Path, quantize: str, tokens: int, steps: int, out: Path) -> dict:
    return {
        "model": {"name": str(model), "quantize": quantize},
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": str(data), "format": "text", "max_length": tokens, "validation_fraction": 0.0},
        "train": {"max_steps": steps, "batch_size": 1, "learning_rate": 1e-4, "precision": "bf16",
                  "gradient_checkpointing": False, "distributed": "fsdp", "checkpoint_every": 0, "num_samples": 0},
        "output_dir": str(out),
    }


def rank_child(config: str, out: str) -> int:
    """One rank: the real CLI, then this process's peak RSS into OUT/rank-R.json, with the peak it had reached
    when training was about to start (model loaded and sharded, adapter and optimizer made)."""
    import loratune.train.loop as loop
    from loratune.cli import main as cli

    start_run, marks = loop.start_run, {}

    def marked(*args, **kwargs):
        run = start_run(*args, **kwargs)
        marks["before_steps_mb"] = peak_rss_mb()
        return run

    loop.start_run = marked
    code = cli(["train", config, "--quiet"])
    rank = int(os.environ.get("RANK", 0))
    Path(out, f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "code": code, "peak_rss_mb": peak_rss_mb(),
                                                          **marks}))
    return code


def measure(model: Path, quantize: str, processes: int, args: argparse.Namespace, work: Path) -> dict:
    """One torchrun job of `processes` ranks: every rank's peak RSS (MB), or the job's error."""
    out = work / f"{quantize}-{processes}"
    out.mkdir()
    data = work / "data.jsonl"
    if not data.is_file():
        words = [f"w{(7 * i) % WORDS}" for i in range(64 * args.tokens)]
        data.write_text("".join(json.dumps({"text": " ".join(words[i:i + 2 * args.tokens])}) + "\n"
                                for i in range(0, len(words), 2 * args.tokens)))
    config = out / "run.json"
    config.write_text(json.dumps(run_config(model, data, quantize, args.tokens, args.steps, out / "run")))
    env = {"OMP_NUM_THREADS": "1"}
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(args.src).resolve()), str(ROOT)])
    child = run_child([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                       "-m", "benchmarks.fsdp_memory", "--rank-child", str(config), str(out)], args.timeout, **env)
    ranks = sorted((json.loads(p.read_text()) for p in out.glob("rank-*.json")), key=lambda r: r["rank"])
    row = {"quantize": quantize, "processes": processes, "wall_s": round(child.wall_s, 1),
           "peak_rss_mb": [round(r["peak_rss_mb"]) for r in ranks],
           "before_steps_mb": [round(r.get("before_steps_mb", 0)) for r in ranks]}
    if child.code or len(ranks) != processes or any(r["code"] for r in ranks):
        row["error"] = f"exit {child.code}: " + (child.output.strip().splitlines() or [""])[-1][:200]
    return row


def table(rows: list[dict]) -> str:
    lines = ["| base | processes | peak RSS per rank, MB (rank 0, 1, ...) | largest | vs 1 process "
             "| peak before the first step, MB | wall s |", "|---|---|---|---|---|---|---|"]
    single = {r["quantize"]: max(r["peak_rss_mb"]) for r in rows if r["processes"] == 1 and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['quantize']} | {r['processes']} | {r['error']} | | | | |")
            continue
        top, one = max(r["peak_rss_mb"]), single.get(r["quantize"])
        ratio = f"{top / one:.2f}x" if one else "-"
        lines.append(f"| {r['quantize']} | {r['processes']} | {', '.join(map(str, r['peak_rss_mb']))} | {top} | "
                     f"{ratio} | {', '.join(map(str, r['before_steps_mb']))} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fsdp_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="1.1b")
    parser.add_argument("--model-dir", type=Path, help="where the random model is written once (default: /tmp)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--formats", nargs="+", choices=["nf4", "int8"], default=["nf4", "int8"])
    parser.add_argument("--tokens", type=int, default=128, help="tokens per step (batch 1; default 128)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per run (default 2)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run before it is abandoned")
    parser.add_argument("--src", help="measure the loratune of this `src` folder instead of the worktree's")
    parser.add_argument("--name", default="fsdp_memory", help="results/NAME.json and .md (default fsdp_memory)")
    parser.add_argument("--docs", action="store_true", help="rewrite the table block of docs/distributed.md")
    parser.add_argument("--rank-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_child:
        return rank_child(*args.rank_child)
    model = write_model(args.model_dir or Path(tempfile.gettempdir()) / f"loratune-llama-{args.size}", SIZES[args.size])
    rows = []
    with tempfile.TemporaryDirectory(prefix="fsdp-memory-") as work:
        for quantize in args.formats:
            for processes in args.processes:
                rows.append(measure(model, quantize, processes, args, Path(work)))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    write_result(args.name, {"machine": machine(), "size": args.size, "src": args.src, "rows": rows}, text)
    if args.docs:
        meta = machine()
        replace_block(DOCS_PAGE, args.name, f"`{meta['command']}`, {meta['date']}, {meta['cpu']}\n\n{text}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
