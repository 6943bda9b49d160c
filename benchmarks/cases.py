"""Benchmark cases: which model, which LoRA variants, which batch; and the model builders."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from typing import Any

import torch

SEED = 0
LORA_DROPOUT = 0.05
MIXED_ADAPTERS = 8


@dataclass(frozen=True)
class Variant:
    """One LoRA setting on a case's model; alpha is 2 * r for every variant."""

    name: str
    r: int
    targets: tuple[str, ...] | str

    @property
    def target_spec(self) -> list[str] | str:
        return self.targets if isinstance(self.targets, str) else list(self.targets)


@dataclass(frozen=True)
class Case:
    """A model shape plus the variants and batch it is benchmarked with.

    `kind` is "train" (training step, forward latencies, merge, save/load) or "mixed" (a batch whose
    rows use different adapters, against the same batch on one adapter).
    """

    name: str
    kind: str
    model: str
    variants: tuple[Variant, ...]
    batch: int
    seq_len: int
    description: str


ALL_LINEAR = Variant("all-linear-r16", 16, "all-linear")

CASES: dict[str, Case] = {
    "gpt2-small": Case(
        "gpt2-small", "train", "gpt2-small",
        (Variant("c_attn-r8", 8, ("c_attn",)), ALL_LINEAR), 4, 256,
        "GPT-2 124M (GPT2Config defaults), random init"),
    "llama-220m": Case(
        "llama-220m", "train", "llama-220m",
        (Variant("q_v-r8", 8, ("q_proj", "v_proj")), ALL_LINEAR), 4, 256,
        "Llama, hidden 1024, 12 layers, intermediate 2816, 16 heads, vocab 32000, random init"),
    "smollm2": Case(
        "smollm2", "train", "smollm2",
        (Variant("q_v-r8", 8, ("q_proj", "v_proj")), ALL_LINEAR), 4, 256,
        "SmolLM2-135M-Instruct, real weights via loratune.pretrained.load_model"),
    "mixed-batch": Case(
        "mixed-batch", "mixed", "gpt2-small",
        (Variant("all-linear-r8", 8, "all-linear"),), MIXED_ADAPTERS, 256,
        f"GPT-2 124M shape; {MIXED_ADAPTERS} rows on {MIXED_ADAPTERS} different adapters vs all rows on one"),
}

# --quick: tiny shapes, short sequences and one variant per case, for a smoke test.
QUICK_SEQ_LEN = 32
QUICK_TRAIN_BATCH = 2


def select_cases(names: list[str] | None, quick: bool, variants: list[str] | None = None) -> list[Case]:
    """The cases to run (all when `names` is empty), keeping only `variants` if given; shrunk for --quick."""
    chosen = [CASES[n] for n in names] if names else list(CASES.values())
    if variants:
        chosen = [replace(c, variants=tuple(v for v in c.variants if v.name in variants)) for c in chosen]
        chosen = [c for c in chosen if c.variants]
    return [_quick(case) for case in chosen] if quick else chosen


def _quick(case: Case) -> Case:
    batch = case.batch if case.kind == "mixed" else QUICK_TRAIN_BATCH
    return Case(case.name, case.kind, case.model, case.variants[:1], batch, QUICK_SEQ_LEN, case.description)


def unavailable_reason(case: Case, quick: bool) -> str | None:
    """Why a case cannot run here (checked in the parent, before starting any subprocess), else None."""
    if case.model != "smollm2":
        return None
    if quick:
        return "skipped in --quick mode (loads real weights)"
    if importlib.util.find_spec("loratune.pretrained") is None:
        return "unavailable: loratune.pretrained is not importable"
    try:
        from loratune.pretrained import load_model  # noqa: F401
    except ImportError as exc:
        return f"unavailable: {exc}"
    return None


def build_model(name: str, quick: bool) -> Any:
    """A causal LM for `name`, seeded so every configuration starts from the same weights."""
    torch.manual_seed(SEED)
    if name == "gpt2-small":
        return _gpt2(quick)
    if name == "llama-220m":
        return _llama(quick)
    if name == "smollm2":
        from loratune.pretrained import load_model

        model, _ = load_model("smollm2-135m-instruct", "causal-lm")
        return model
    raise KeyError(f"unknown benchmark model {name!r}")


def _gpt2(quick: bool) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=128) if quick else GPT2Config()
    return GPT2LMHeadModel(config)


def _llama(quick: bool) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    if quick:
        config = LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=176, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=1000, max_position_embeddings=128)
    else:
        config = LlamaConfig(hidden_size=1024, num_hidden_layers=12, intermediate_size=2816, num_attention_heads=16,
                             num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048)
    return LlamaForCausalLM(config)


def random_batches(vocab_size: int, count: int, batch: int, seq_len: int) -> list[torch.Tensor]:
    """`count` batches of random token ids, the same for every configuration (fixed seed)."""
    generator = torch.Generator().manual_seed(SEED)
    return [torch.randint(0, vocab_size, (batch, seq_len), generator=generator) for _ in range(count)]
