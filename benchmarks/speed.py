"""loratune's LoRA layers against PEFT's: training step, forwards, merge, save/load, mixed-adapter batches.

Both libraries are driven through their public API (loratune: `add_adapter`, `merge`, `mixed_adapter_batch`,
...; PEFT: `get_peft_model` and `PeftModel`'s methods) and train with the same plain step (the model's own
loss, AdamW), so the difference is the adapter layers. The whole job, loratune's trainer included, is the
race (`benchmarks/race.py`). Each configuration runs in a fresh process (`common.run_child`), so its peak RSS
is its own; configurations alternate round by round and the tables show medians with min-max.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine, run_child, write_result

MIXED_ADAPTERS = 8
REPS = 3  # timed forwards, merges and save/loads per process, after one untimed


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    variants: dict[str, tuple[int, list[str] | str]]  # variant name -> (r, targets); alpha is 2r, dropout 0.05
    batch: int
    seq_len: int = 256
    mixed: bool = False


QV, ALL = ["q_proj", "v_proj"], "all-linear"
CASES = {
    "gpt2-small": Case("gpt2-small", "gpt2", {"c_attn-r8": (8, ["c_attn"]), "all-linear-r16": (16, ALL)}, 4),
    "llama-220m": Case("llama-220m", "llama", {"q_v-r8": (8, QV), "all-linear-r16": (16, ALL)}, 4),
    "smollm2": Case("smollm2", "smollm2", {"q_v-r8": (8, QV), "all-linear-r16": (16, ALL)}, 4),
    "mixed-batch": Case("mixed-batch", "gpt2", {"all-linear-r8": (8, ALL)}, MIXED_ADAPTERS, mixed=True),
}
CONFIGS = {"loratune": "auto", "peft-fp32": "fp32", "peft-bf16": "bf16"}  # label -> precision


def build_model(name: str, quick: bool) -> Any:
    """The case's causal LM, seeded so that every configuration starts from the same weights."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "smollm2":
        from loratune.pretrained import load_model

        return load_model("smollm2-135m-instruct", "causal-lm")[0]
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000) if quick else GPT2Config())
    size = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=176, num_attention_heads=4, vocab_size=1000) \
        if quick else dict(hidden_size=1024, num_hidden_layers=12, intermediate_size=2816, num_attention_heads=16,
                           vocab_size=32000)
    return LlamaForCausalLM(LlamaConfig(**size, num_key_value_heads=size["num_attention_heads"]))


def precision(label: str, device: str) -> str:
    """`auto` as `loratune train` resolves it (bf16 where bf16 matmuls are native, else fp32)."""
    from loratune.precision import resolve_precision

    return resolve_precision("auto", torch.device(device)) if CONFIGS[label] == "auto" else CONFIGS[label]


class Adapted:
    """One library's adapted model and the operations measured on it."""

    def __init__(self, label: str, model: Any, r: int, targets: list[str] | str, spec: dict[str, Any]) -> None:
        self.peft, self.r, self.targets, self.spec = label.startswith("peft"), r, targets, spec
        self.bf16 = precision(label, spec["device"]) == "bf16"
        if self.peft:
            import peft

            self.model = peft.get_peft_model(model, self._peft_config(model))
        else:
            import loratune as lt
            from loratune.precision import base_dtype

            self.lt = lt
            model.to(base_dtype("auto", "bf16" if self.bf16 else "fp32"))  # as `loratune train` stores the base
            self.model = model
            lt.add_adapter(model, self._config(), "default")
        self.model.to(spec["device"])

    def _config(self) -> Any:
        return self.lt.LoraConfig(r=self.r, lora_alpha=2 * self.r, lora_dropout=0.05, target_modules=self.targets,
                                  init_lora_weights=not self.spec["mixed"])

    def _peft_config(self, model: Any) -> Any:
        import peft

        return peft.LoraConfig(r=self.r, lora_alpha=2 * self.r, lora_dropout=0.05, target_modules=self.targets,
                               init_lora_weights=not self.spec["mixed"], task_type="CAUSAL_LM",
                               fan_in_fan_out=model.config.model_type == "gpt2")

    def autocast(self) -> contextlib.AbstractContextManager:
        device = torch.device(self.spec["device"]).type
        return torch.autocast(device, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def disabled(self) -> contextlib.AbstractContextManager:
        return self.model.disable_adapter() if self.peft else self.lt.disable_adapters(self.model)

    def merge(self, undo: bool = False) -> None:
        if self.peft:
            (self.model.unmerge_adapter if undo else self.model.merge_adapter)()
        else:
            (self.lt.unmerge if undo else self.lt.merge)(self.model)

    def save_load(self, folder: Path, name: str) -> tuple[float, float]:
        if self.peft:
            save = lambda: self.model.save_pretrained(str(folder), selected_adapters=["default"])  # noqa: E731
            load = lambda: self.model.load_adapter(str(folder), adapter_name=name)  # noqa: E731
        else:
            save = lambda: self.lt.save_adapter(self.model, folder)  # noqa: E731
            load = lambda: self.lt.load_adapter(self.model, folder, name=name)  # noqa: E731
        seconds = once(save, self.spec["device"]), once(load, self.spec["device"])
        self.model.delete_adapter(name) if self.peft else self.lt.delete_adapter(self.model, name)
        return seconds

    def add(self, name: str) -> None:
        if self.peft:
            self.model.add_adapter(name, self._peft_config(self.model.get_base_model()))
        else:
            self.lt.add_adapter(self.model, self._config(), name)
        self.model.to(self.spec["device"])

    def forward(self, ids: torch.Tensor, rows: list[str] | None = None) -> None:
        with torch.no_grad(), self.autocast():
            if rows is None or self.peft:
                self.model(input_ids=ids, **({"adapter_names": rows} if rows else {}))
            else:
                with self.lt.mixed_adapter_batch(self.model, rows):
                    self.model(input_ids=ids)


def once(fn: Callable[[], Any], device: str) -> float:
    """Seconds of one call of `fn` (after the device has finished it)."""
    started = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def timed(fn: Callable[[], Any], device: str) -> float:
    """Median seconds of `fn` over REPS calls, after one untimed call."""
    return statistics.median([once(fn, device) for _ in range(REPS + 1)][1:])


def train_metrics(lib: Adapted, batches: list[torch.Tensor], warmup: int) -> dict[str, float]:
    """Step time over the batches after `warmup`, the first step's matmul FLOPs, forwards, merge, save/load."""
    from torch.utils.flop_counter import FlopCounterMode

    model, device = lib.model, lib.spec["device"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(ids: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        with lib.autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        return float(loss)

    counter = FlopCounterMode(display=False)
    with counter:
        first_loss = step(batches[0])
    for ids in batches[1:warmup]:
        step(ids)
    times = [once(lambda ids=ids: step(ids), device) for ids in batches[warmup:]]
    step_s = statistics.median(times)
    out = {"step_s": step_s, "tokens_per_s": batches[0].numel() / step_s, "first_loss": first_loss,
           "step_gflop": counter.get_total_flops() / 1e9,
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    model.eval()
    ids = batches[0]
    rounds: dict[str, list[float]] = {k: [] for k in ("fwd_base_s", "fwd_unmerged_s", "merge_s", "fwd_merged_s",
                                                       "unmerge_s")}
    for _ in range(REPS + 1):  # interleaved, so that drift of a noisy machine hits the three forwards alike
        with lib.disabled():
            rounds["fwd_base_s"].append(once(lambda: lib.forward(ids), device))
        rounds["fwd_unmerged_s"].append(once(lambda: lib.forward(ids), device))
        rounds["merge_s"].append(once(lib.merge, device))
        rounds["fwd_merged_s"].append(once(lambda: lib.forward(ids), device))
        rounds["unmerge_s"].append(once(lambda: lib.merge(undo=True), device))
    out.update({k: statistics.median(v[1:]) for k, v in rounds.items()})  # the first round warms up
    with tempfile.TemporaryDirectory() as tmp:
        pairs = [lib.save_load(Path(tmp) / str(i), f"loaded{i}") for i in range(REPS)]
    out.update(save_s=statistics.median(p[0] for p in pairs), load_s=statistics.median(p[1] for p in pairs))
    return out


def mixed_metrics(lib: Adapted, ids: torch.Tensor) -> dict[str, float]:
    """A batch whose row i uses adapter i, against the same batch on one adapter."""
    names = ["default"] + [f"a{i}" for i in range(1, MIXED_ADAPTERS)]
    for name in names[1:]:
        lib.add(name)
    lib.model.eval()
    single = timed(lambda: lib.forward(ids), lib.spec["device"])
    mixed = timed(lambda: lib.forward(ids, [names[i % len(names)] for i in range(len(ids))]), lib.spec["device"])
    return {"single_tokens_per_s": ids.numel() / single, "mixed_tokens_per_s": ids.numel() / mixed,
            "mixed_over_single": mixed / single}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration of one case variant, in this (fresh) process."""
    torch.set_num_threads(spec["threads"])
    case = CASES[spec["case"]]
    r, targets = case.variants[spec["variant"]]
    batch, seq = (2, 32) if spec["quick"] and not case.mixed else (case.batch, 32 if spec["quick"] else case.seq_len)
    model = build_model(case.model, spec["quick"])
    lib = Adapted(spec["config"], model, r, targets, {**spec, "mixed": case.mixed})
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator).to(spec["device"])
               for _ in range(spec["warmup"] + spec["steps"])]
    out = mixed_metrics(lib, batches[0]) if case.mixed else train_metrics(lib, batches, spec["warmup"])
    if spec["device"].startswith("cuda"):
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return {**out, "precision": "bf16" if lib.bf16 else "fp32"}


def run_variant(case: Case, variant: str, args: Any) -> dict[str, Any]:
    """Every configuration of one variant, alternated round by round; bf16 only where it is native."""
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS if CONFIGS[c] != "bf16" or precision("loratune",
                                                                                                 args.device) == "bf16"}
    for round_index in range(args.repeats):
        for config in runs:
            spec = {"case": case.name, "variant": variant, "config": config, "quick": args.quick,
                    "steps": args.steps, "warmup": args.warmup, "device": args.device, "threads": args.threads}
            child = run_child([sys.executable, "-m", "benchmarks.speed", json.dumps(spec)])
            lines = child.output.strip().splitlines()
            if child.code != 0 or not lines:
                raise SystemExit(f"{case.name}/{variant}/{config} failed:\n{child.output[-3000:]}")
            runs[config].append({**json.loads(lines[-1]), "peak_rss_mb": child.peak_rss_mb})
            print(f"[{case.name}/{variant}] round {round_index + 1} {config}: {lines[-1]}", file=sys.stderr)
    return {"case": case.name, "variant": variant, "batch": case.batch, "mixed": case.mixed, "runs": runs}


LABELS = {"tokens_per_s": ("tokens/s", 0), "step_s": ("train step (s)", 3), "peak_rss_mb": ("peak RSS (MiB)", 0),
          "peak_cuda_mb": ("peak CUDA memory (MiB)", 0), "step_gflop": ("matmul GFLOP per step", 1),
          "trainable_params": ("trainable params", 0), "fwd_base_s": ("forward, adapters off (s)", 3),
          "fwd_unmerged_s": ("forward, unmerged (s)", 3), "fwd_merged_s": ("forward, merged (s)", 3),
          "merge_s": ("merge (s)", 3), "unmerge_s": ("unmerge (s)", 3), "save_s": ("adapter save (s)", 3),
          "load_s": ("adapter load (s)", 3), "first_loss": ("loss, first step (parity check)", 4),
          "single_tokens_per_s": ("tokens/s, one adapter", 0), "mixed_tokens_per_s": ("tokens/s, 8 adapters", 0),
          "mixed_over_single": ("time mixed / one adapter", 2)}


def markdown(rows: list[dict[str, Any]]) -> str:
    """One table per case variant: median (min-max) per configuration, and loratune / each PEFT one."""
    out = []
    for row in rows:
        configs = list(row["runs"])
        out += [f"### {row['case']} / {row['variant']}", "",
                "| metric | " + " | ".join(f"{c} ({row['runs'][c][0]['precision']})" for c in configs)
                + "".join(f" | loratune / {c}" for c in configs[1:]) + " |", "|---" * (2 * len(configs)) + "|"]
        for key, (label, decimals) in LABELS.items():
            values = {c: [run[key] for run in row["runs"][c] if key in run] for c in configs}
            if not all(values.values()):
                continue
            medians = {c: statistics.median(v) for c, v in values.items()}
            cells = [f"{medians[c]:,.{decimals}f}" + (f" ({min(v):,.{decimals}f}-{max(v):,.{decimals}f})"
                                                      if len(v) > 1 else "") for c, v in values.items()]
            ratios = [f"{medians['loratune'] / medians[c]:.2f}" if medians[c] else "-" for c in configs[1:]]
            out.append(f"| {label} | " + " | ".join(cells + ratios) + " |")
        out.append("")
    return "\n".join(out)


def run(args: Any) -> int:
    """`python -m benchmarks run`: the chosen cases, written to results/latest (quick: results/quick)."""
    started = time.perf_counter()
    cases = [CASES[name] for name in args.case or CASES if not (args.quick and name == "smollm2")]
    chosen = [(case, v) for case in cases for v in case.variants if not args.variant or v in args.variant]
    if args.quick:  # one variant per case
        chosen = [(case, v) for i, (case, v) in enumerate(chosen) if i == 0 or chosen[i - 1][0] is not case]
    rows = [run_variant(case, variant, args) for case, variant in chosen]
    result = {"machine": machine(), "wall_s": round(time.perf_counter() - started, 1), "threads": args.threads,
              "device": args.device, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
              "rows": rows}
    table = f"{args.warmup} warm-up + {args.steps} timed steps per process, {args.repeats} round(s), " \
            f"{args.threads} threads, {args.device}, {result['wall_s']} s.\n\n" + markdown(rows)
    stem = "quick" if args.quick else "latest"
    paths = write_result(stem, result, table, None if args.quick or args.no_docs else "RESULTS")
    print(table + "\nwrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))))
