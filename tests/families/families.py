"""Tiny random-weight models of each family the matrix checks (fixed seed; 2 layers, hidden 32).

Each entry builds a model folder loadable by name, with the tests' word-level tokenizer (conftest.py), so
`loratune.train.fit` loads it the way it loads a user's model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

SEED = 0
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "[CLS]", "[SEP]"]
WORDS = ("the cat sat on a mat dog ran good bad great awful movie film plot acting review sentiment positive "
         "negative hello world user assistant : . ? !").split()
VOCAB = {token: i for i, token in enumerate(SPECIALS + WORDS)}
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant : {% endif %}")
SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=128)
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # "causal", "encoder" or "seq2seq"
    model_class: str
    config_class: str
    config: dict[str, Any]

    @property
    def task(self) -> str:
        return {"causal": "causal-lm", "encoder": "classification", "seq2seq": "seq2seq"}[self.kind]

    def build(self, vocab_size: int) -> torch.nn.Module:
        config = getattr(transformers, self.config_class)(vocab_size=vocab_size, **self.config)
        torch.manual_seed(SEED)
        return getattr(transformers, self.model_class)(config).eval()


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over VOCAB (ids known to the tests), with a chat template."""
    core = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        cls_token="[CLS]", sep_token="[SEP]")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _causal(name: str, prefix: str, **config: Any) -> Family:
    model_class = config.pop("model_class", f"{prefix}ForCausalLM")
    return Family(name, "causal", model_class, config.pop("config_class", f"{prefix}Config"),
                  {**SIZES, **TOKENS, "tie_word_embeddings": False, **config})


FAMILIES = [
    _causal("Llama", "Llama"),
    _causal("Mistral", "Mistral", sliding_window=16),
    _causal("Qwen2", "Qwen2"),
    _causal("Qwen3", "Qwen3", head_dim=16),
    _causal("Gemma 2", "Gemma2", head_dim=16, sliding_window=16),
    _causal("Gemma 3 (text)", "Gemma3", config_class="Gemma3TextConfig", head_dim=16, sliding_window=16),
    _causal("Phi-3", "Phi3", num_key_value_heads=2),
    _causal("OLMo 2", "Olmo2"),
    _causal("StableLM", "StableLm"),
    _causal("SmolLM3", "SmolLM3"),
    Family("GPT-2", "causal", "GPT2LMHeadModel", "GPT2Config",
           dict(n_embd=32, n_layer=2, n_head=2, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                **TOKENS)),
    Family("GPT-NeoX", "causal", "GPTNeoXForCausalLM", "GPTNeoXConfig",
           dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=128, tie_word_embeddings=False, **TOKENS)),
    Family("Falcon", "causal", "FalconForCausalLM", "FalconConfig",
           dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128,
                new_decoder_architecture=True, num_kv_heads=1, **TOKENS)),
    Family("BERT", "encoder", "BertForSequenceClassification", "BertConfig",
           dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=128, pad_token_id=0, num_labels=2)),
    Family("RoBERTa", "encoder", "RobertaForSequenceClassification", "RobertaConfig",
           dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=130, num_labels=2, **TOKENS)),
    Family("DeBERTa-v2", "encoder", "DebertaV2ForSequenceClassification", "DebertaV2Config",
           dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=128, pad_token_id=0, num_labels=2)),
    Family("ModernBERT", "encoder", "ModernBertForSequenceClassification", "ModernBertConfig",
           dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=128, num_labels=2, global_attn_every_n_layers=2, local_attention=16,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=4, sep_token_id=5)),
    Family("T5", "seq2seq", "T5ForConditionalGeneration", "T5Config",
           dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, pad_token_id=0, eos_token_id=2,
                decoder_start_token_id=0)),
    Family("BART", "seq2seq", "BartForConditionalGeneration", "BartConfig",
           dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                forced_eos_token_id=None, decoder_start_token_id=2, **TOKENS)),
]
