"""Tiny transformers models built from configs with random weights and a fixed seed (no downloads)."""

from __future__ import annotations

import os

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 64
SEED = 0


def _build(model_cls, config, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = model_cls(config)
    model.eval()
    return model


def gpt2(seed: int = SEED, **overrides) -> GPT2LMHeadModel:
    """GPT-2 with transformers' Conv1D layers (c_attn, c_proj, c_fc) and tied wte / lm_head."""
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2, **overrides)
    return _build(GPT2LMHeadModel, config, seed)


def llama(seed: int = SEED, **overrides) -> LlamaForCausalLM:
    sizes = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False)
    config = LlamaConfig(**{**sizes, **overrides})
    return _build(LlamaForCausalLM, config, seed)


def bert_classifier(seed: int = SEED, num_labels: int = 3, **overrides) -> BertForSequenceClassification:
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=num_labels, **overrides)
    return _build(BertForSequenceClassification, config, seed)


def t5(seed: int = SEED, **overrides) -> T5ForConditionalGeneration:
    config = T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
                      num_heads=2, decoder_start_token_id=0, **overrides)
    return _build(T5ForConditionalGeneration, config, seed)


def opt(seed: int = SEED, **overrides) -> OPTForCausalLM:
    config = OPTConfig(vocab_size=VOCAB, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                       max_position_embeddings=32, word_embed_proj_dim=16, **overrides)
    return _build(OPTForCausalLM, config, seed)


def mistral(seed: int = SEED, **overrides) -> MistralForCausalLM:
    """Llama's shape with a sliding attention window (`sliding_window`, default 16 here)."""
    sizes = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=64, sliding_window=16)
    return _build(MistralForCausalLM, MistralConfig(**{**sizes, **overrides}), seed)


def bloom(seed: int = SEED, **overrides) -> BloomForCausalLM:
    """A model with ALiBi position biases, built from the attention mask."""
    config = BloomConfig(vocab_size=VOCAB, hidden_size=16, n_layer=2, n_head=2, hidden_dropout=0.0,
                         attention_dropout=0.0, **overrides)
    return _build(BloomForCausalLM, config, seed)


def input_ids(batch: int = 2, length: int = 8, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=generator)


def logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    """The model's logits for `ids` (encoder-decoder models get the same ids as decoder input)."""
    ids = input_ids() if ids is None else ids
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids).logits
        return model(input_ids=ids).logits


BUILDERS = {"gpt2": gpt2, "llama": llama, "bert": bert_classifier, "t5": t5, "opt": opt}


class TokenNet(nn.Module):
    """Embedding -> Linear -> transformers Conv1D -> Linear head: one of each token-level layer type."""

    def __init__(self, vocab: int = 20, dim: int = 12, hidden: int = 10, seed: int = SEED) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, hidden)
        self.mix = Conv1D(hidden, hidden)  # weight (in, out)
        nn.init.normal_(self.mix.weight, std=0.3)
        nn.init.normal_(self.mix.bias, std=0.1)
        self.head = nn.Linear(hidden, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(torch.tanh(self.proj(self.emb(ids))))))


class ConvNet(nn.Module):
    """Conv2d -> Conv1d -> Linear, for convolution LoRA."""

    def __init__(self, seed: int = SEED) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv2 = nn.Conv2d(3, 6, kernel_size=3, padding=1, stride=1)
        self.conv1 = nn.Conv1d(6, 5, kernel_size=3, padding=1, dilation=1)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(x))  # (b, 6, H, W)
        h = torch.relu(self.conv1(h.flatten(2)))  # (b, 5, H*W)
        return self.head(h.mean(-1))


def token_ids(batch: int = 3, length: int = 5, vocab: int = 20, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def images(batch: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, type]]:
    """Every state-dict tensor (cloned) and every module's type, to show that nothing changed."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, {path: type(m) for path, m in model.named_modules()}


def assert_unchanged(model: nn.Module, before: tuple[dict[str, torch.Tensor], dict[str, type]]) -> None:
    state, types = snapshot(model)
    assert types == before[1]
    assert state.keys() == before[0].keys()
    for key, value in state.items():  # bit-identical, NaN included
        torch.testing.assert_close(value, before[0][key], rtol=0, atol=0, equal_nan=True, msg=key)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()
