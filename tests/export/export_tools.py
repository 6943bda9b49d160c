"""Fixtures and helpers for the export tests: a tiny Llama folder with a byte-level BPE tokenizer and chat template,
and adapters with non-zero B. Test modules import the fixtures by name (a conftest.py here would shadow the
`from conftest import` of other test folders)."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import loratune as lt

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = ["the cat sat on the mat", "a good movie with great acting", "the plot was awful and the film bad"] * 20
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(TEXT, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def save_adapter(folder, model_dir, seed: int = 1, targets=TARGETS, **lora) -> str:
    """An adapter with non-zero lora_B (a freshly initialised one would change nothing)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": list(targets), **lora}
    lt.add_adapter(model, lt.LoraConfig(**settings))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    lt.save_adapter(model, folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """Llama with grouped-query attention (4 heads, 2 KV heads), so q and k are reordered differently."""
    tokenizer = bpe_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_llama_dir):
    return save_adapter(tmp_path_factory.mktemp("adapter"), tiny_llama_dir)
