"""Shared fixtures: the real SmolLM2 (cached), and tiny model folders with a word-level tokenizer for runs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the hub
# `loratune` children keep the system's malloc whether or not the machine has jemalloc (tests/test_allocator.py
# runs the restart on purpose), so they start once and behave alike everywhere
os.environ.setdefault("LORATUNE_MALLOC", "system")

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)


@pytest.fixture(scope="session", autouse=True)
def dequant_kernels_built():
    """Build the quantized layers' kernels (about 25 s on a fresh machine) before any test, so that no test's
    child process or time limit pays for it; the children find them built."""
    from loratune.quant.native import dequant_kernels

    return dequant_kernels()


@pytest.fixture(scope="session")
def model_cache(request, tmp_path_factory):
    """Where converted models go: .pytest_cache (kept between runs), also for code that reads LORATUNE_CACHE."""
    store = getattr(request.config, "cache", None)
    cache = store.mkdir("loratune-models") if store is not None else tmp_path_factory.mktemp("models")
    os.environ["LORATUNE_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def smollm2(model_cache):
    """(model, tokenizer) of the built-in SmolLM2; the dequantized copy takes about 20 s to make once."""
    from loratune.pretrained import load_model

    return load_model("smollm2-135m-instruct", "causal-lm", cache_dir=model_cache)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    return smollm2[1]


SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "[CLS]", "[SEP]"]
WORDS = ("the cat sat on a mat dog ran good bad great awful movie film plot acting review sentiment "
         "positive negative hello world el gato perro bueno malo user assistant system : . , ? ! |").split()
VOCAB = {token: i for i, token in enumerate(SPECIALS + WORDS)}
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant : {% endif %}")


def make_tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", cls_token="[CLS]", sep_token="[SEP]")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _save(folder, model):
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(VOCAB), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _save(tmp_path_factory.mktemp("gpt2"), GPT2LMHeadModel(config))


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("llama"), _tiny_llama())


@pytest.fixture(scope="session")
def tiny_llama_bf16(tmp_path_factory):
    """The tiny Llama saved in bf16, as most checkpoints ship (with an untied head)."""
    return _save(tmp_path_factory.mktemp("llama-bf16"), _tiny_llama().to(torch.bfloat16))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0, num_labels=2)
    return _save(tmp_path_factory.mktemp("bert"), BertForSequenceClassification(config))


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory):
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(VOCAB), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                      pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    return _save(tmp_path_factory.mktemp("t5"), T5ForConditionalGeneration(config))


POSITIVE = ["good movie", "great film", "good acting", "great plot", "good review", "great acting"]
NEGATIVE = ["bad movie", "awful film", "bad acting", "awful plot", "bad review", "awful acting"]


@pytest.fixture
def sentiment_file(tmp_path):
    rows = [{"text": f"the {t}", "label": "positive"} for t in POSITIVE] + \
           [{"text": f"the {t}", "label": "negative"} for t in NEGATIVE]
    path = tmp_path / "sentiment.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 3), encoding="utf-8")
    return str(path)


@pytest.fixture
def run_config(tmp_path, tiny_gpt2, sentiment_file):
    """A small causal-LM run: sentiment as generation on tiny GPT-2. Returns a dict to adjust, then validate."""
    def build(**sections):
        data = {
            "model": {"name": tiny_gpt2, "task": "causal-lm"},
            "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["c_attn", "c_fc"]},
            "data": {"train": sentiment_file, "format": "classification", "prompt_template": "{text} sentiment :",
                     "completion_template": "{label}", "validation_fraction": 0.25, "max_length": 32},
            "train": {"max_steps": 6, "batch_size": 4, "learning_rate": 0.01, "precision": "fp32",
                      "eval_batch_size": 8, "max_new_tokens": 2, "seed": 0},
            "output_dir": str(tmp_path / "run"),
        }
        for section, values in sections.items():
            if isinstance(values, dict):
                data[section].update(values)
            else:
                data[section] = values
        return data
    return build
