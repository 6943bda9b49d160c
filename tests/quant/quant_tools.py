"""Tiny seeded models and small helpers shared by the quantization tests (no downloads)."""

from __future__ import annotations

import os

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 128


def llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """Llama with every body layer quantizable in NF4 (all weight sizes are multiples of 64)."""
    sizes = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**sizes, **overrides})).eval()


def gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    """GPT-2 with transformers' Conv1D layers (weights stored transposed) and a tied LM head."""
    sizes = dict(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=2)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**{**sizes, **overrides})).eval()


def bert(seed: int = 0, **overrides) -> BertForSequenceClassification:
    sizes = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                 max_position_embeddings=64, num_labels=2)
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**{**sizes, **overrides})).eval()


def input_ids(vocab: int = VOCAB, batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
