"""Streaming quantized load: safetensors read tensor by tensor onto a meta-device model, checked against
`from_pretrained` followed by `quantize_model`.

(Named test_quant_loading.py, not test_loading.py: tests/data/test_loading.py exists and test folders have
no __init__.py, so equal basenames would collide at collection.)
"""

import json
import shutil
import struct

import pytest
import torch
import transformers
from quant_tools import bert, gpt2, input_ids, llama, logits
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer

import loratune.quant.streaming as loading
from loratune.errors import ModelLoadError, QuantizationError
from loratune.pretrained import load_model
from loratune.quant import QuantLinear, quantize_model
from loratune.quant.streaming import read_tensors, safetensors_files


@pytest.fixture(scope="module")
def tokenizer(tiny_gpt2):
    """The word-level tokenizer of tests/conftest.py (make_tokenizer), as saved with the tiny GPT-2."""
    return AutoTokenizer.from_pretrained(tiny_gpt2)


def save_sharded(folder, model, tokenizer):
    model.save_pretrained(folder, max_shard_size="100KB")
    tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file() and len(safetensors_files(folder)) > 1
    return folder


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, tokenizer):
    return save_sharded(tmp_path_factory.mktemp("llama"), llama(vocab_size=len(tokenizer)), tokenizer)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, tokenizer):
    return save_sharded(tmp_path_factory.mktemp("gpt2"), gpt2(vocab_size=len(tokenizer)), tokenizer)


@pytest.fixture
def no_from_pretrained(monkeypatch):
    """Make sure the streaming path is the one under test: the in-memory loaders are off limits."""
    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained must not be called when streaming a quantized model")

    for name in ("AutoModelForCausalLM", "AutoModelForSequenceClassification"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)


def in_memory_reference(folder, task, format, double_quant=True, **kwargs):
    model, _ = load_model(str(folder), task, **kwargs)  # from_pretrained, with loratune's head seed
    quantize_model(model, format, double_quant)
    return model


def streamed(folder, task, format, double_quant=True, **kwargs):
    model, _ = load_model(str(folder), task, quantize=format, double_quant=double_quant, **kwargs)
    return model


def assert_same_model(model, reference, ids):
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for key, tensor in expected.items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert (logits(model, ids) - logits(reference, ids)).abs().max() < 1e-6


@pytest.mark.parametrize("which", ["llama", "gpt2"])
@pytest.mark.parametrize("format,double_quant", [("nf4", True), ("nf4", False), ("int8", True)])
def test_streamed_causal_lm_equals_from_pretrained_then_quantize(request, which, format, double_quant, tokenizer):
    folder = request.getfixturevalue(f"{which}_folder")
    reference = in_memory_reference(folder, "causal-lm", format, double_quant)
    request.getfixturevalue("no_from_pretrained")
    model = streamed(folder, "causal-lm", format, double_quant)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) in (14, 8)
    assert type(model.lm_head) is nn.Linear
    assert not any(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    if which == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight  # tied again after loading
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert_same_model(model, reference, input_ids(len(tokenizer)))


def test_the_in_memory_loaders_are_really_off_limits(llama_folder, no_from_pretrained):
    with pytest.raises(AssertionError, match="must not be called"):
        in_memory_reference(llama_folder, "causal-lm", "nf4")


def test_streamed_load_keeps_unquantized_tensors_in_the_requested_dtype(llama_folder, no_from_pretrained):
    model = streamed(llama_folder, "causal-lm", "nf4", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, QuantLinear) and layer.data.dtype == torch.uint8
    full = load_file(next(f for f in safetensors_files(llama_folder)
                          if "model.layers.0.mlp.up_proj.weight" in load_file(f)))["model.layers.0.mlp.up_proj.weight"]
    assert full.dtype == torch.float32
    # quantized straight from the file's fp32 weight, not from a bf16 copy
    restored = layer.dequantize(torch.float32)
    assert ((restored - full).norm() / full.norm()).item() < 0.15


def test_bert_encoder_only_gets_the_classifier_head_from_pretrained_would_give(request, tmp_path, tokenizer):
    model = bert(vocab_size=len(tokenizer))
    model.bert.save_pretrained(tmp_path, max_shard_size="100KB")  # encoder keys without the "bert." prefix
    tokenizer.save_pretrained(tmp_path)
    assert "embeddings.word_embeddings.weight" in json.loads((tmp_path / "model.safetensors.index.json")
                                                             .read_text())["weight_map"]
    reference = in_memory_reference(tmp_path, "classification", "nf4", num_labels=3)
    request.getfixturevalue("no_from_pretrained")
    streamed_model = streamed(tmp_path, "classification", "nf4", num_labels=3)
    head = streamed_model.classifier
    assert type(head) is nn.Linear and head.weight.shape == (3, 64)
    assert torch.equal(head.weight, reference.classifier.weight) and torch.equal(head.bias, reference.classifier.bias)
    assert 0.01 < head.weight.std().item() < 0.03  # initialised (initializer_range 0.02), not left empty
    assert isinstance(streamed_model.bert.pooler.dense, QuantLinear)
    assert torch.equal(streamed_model.bert.embeddings.word_embeddings.weight,
                       model.bert.embeddings.word_embeddings.weight)
    assert streamed_model.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert_same_model(streamed_model, reference, input_ids(len(tokenizer)))


def test_a_saved_classifier_is_read_from_the_file(tiny_bert, no_from_pretrained):
    saved = load_file(f"{tiny_bert}/model.safetensors")
    model = streamed(tiny_bert, "classification", "nf4", num_labels=2)
    assert torch.equal(model.classifier.weight, saved["classifier.weight"])
    assert torch.equal(model.classifier.bias, saved["classifier.bias"])


def test_a_bias_stored_after_its_weight_is_still_loaded(tmp_path, tokenizer, no_from_pretrained):
    """safetensors orders wider dtypes first: fp32 weights then fp16 biases, so each Conv1D's weight is
    quantized before its bias is read."""
    model = gpt2(vocab_size=len(tokenizer))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm) or hasattr(module, "nf"):
                module.bias.normal_()
    state = {k: (v.half() if k.endswith(".bias") else v).clone() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    order = [key for key, _ in read_tensors(tmp_path / "model.safetensors")]
    assert order.index("transformer.h.0.attn.c_attn.weight") < order.index("transformer.h.0.attn.c_attn.bias")

    loaded = streamed(tmp_path, "causal-lm", "nf4")
    for path in ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"):
        layer = loaded.get_submodule(path)
        assert isinstance(layer, QuantLinear)
        assert layer.bias.dtype == torch.float32 and torch.equal(layer.bias, state[f"{path}.bias"].float())
        assert layer.bias.abs().sum() > 0


def copy_folder(source, target):
    shutil.copytree(source, target)
    return target


def test_a_truncated_shard_is_a_model_load_error(llama_folder, tmp_path):
    folder = copy_folder(llama_folder, tmp_path / "model")
    shard = max(safetensors_files(folder), key=lambda f: f.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match=rf"{shard.name}: file is truncated inside tensor"):
        load_model(str(folder), "causal-lm", quantize="nf4")


def test_a_corrupt_header_or_a_missing_shard_is_a_model_load_error(llama_folder, tmp_path):
    folder = copy_folder(llama_folder, tmp_path / "corrupt")
    shard = safetensors_files(folder)[0]
    shard.write_bytes(struct.pack("<Q", 50) + b"{not json" + bytes(60))
    with pytest.raises(ModelLoadError, match=rf"{shard.name}: not a safetensors file"):
        load_model(str(folder), "causal-lm", quantize="nf4")

    folder = copy_folder(llama_folder, tmp_path / "missing")
    safetensors_files(folder)[-1].unlink()
    with pytest.raises(ModelLoadError):
        load_model(str(folder), "causal-lm", quantize="nf4")


def test_weights_missing_from_the_files_are_named(llama_folder, tmp_path):
    folder = copy_folder(llama_folder, tmp_path / "model")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    dropped = index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != dropped}
    index_path.write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"model weight 'model\.layers\.1\.[a-z_.]+' is missing from the model"):
        load_model(str(folder), "causal-lm", quantize="nf4")


def test_a_layer_nf4_cannot_store_is_refused_before_any_weight_is_read(tmp_path, tokenizer, monkeypatch):
    model = llama(vocab_size=len(tokenizer), hidden_size=40, intermediate_size=80, num_attention_heads=2,
                  num_key_value_heads=1)  # k_proj and v_proj are 20 x 40: 800 weights, not a multiple of 64
    save_sharded(tmp_path, model, tokenizer)
    reads = []
    real = loading.read_tensors

    def spy(path):
        reads.append(path)
        return real(path)

    monkeypatch.setattr(loading, "read_tensors", spy)
    with pytest.raises(QuantizationError, match=r"layer 'model\.layers\.0\.self_attn\.k_proj': nf4 needs a weight "
                                                r"size divisible by 64, got shape \(20, 40\)"):
        load_model(str(tmp_path), "causal-lm", quantize="nf4")
    assert reads == []
    loaded, _ = load_model(str(tmp_path), "causal-lm", quantize="int8")  # int8 has no block constraint
    assert isinstance(loaded.model.layers[0].self_attn.k_proj, QuantLinear) and reads


def test_read_tensors_matches_safetensors(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=generator),
        "bf16": torch.randn(4, 2, generator=generator).bfloat16(),
        "f16": torch.randn(7, generator=generator).half(),
        "f64": torch.randn(2, 2, generator=generator).double(),
        "i64": torch.randint(-2**40, 2**40, (6,), generator=generator),
        "i32": torch.randint(-2**30, 2**30, (2, 3), generator=generator, dtype=torch.int32),
        "i16": torch.randint(-2**14, 2**14, (5,), generator=generator, dtype=torch.int16),
        "i8": torch.randint(-128, 127, (3, 3), generator=generator, dtype=torch.int8),
        "u8": torch.randint(0, 255, (9,), generator=generator, dtype=torch.uint8),
        "bool": torch.rand(2, 3, 4, generator=generator) > 0.5,
        "scalar": torch.tensor(3.5),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "metadata is skipped"})
    expected = load_file(path)
    read = dict(read_tensors(path))
    assert read.keys() == expected.keys() == tensors.keys()
    for key, tensor in expected.items():
        assert read[key].dtype == tensor.dtype and read[key].shape == tensor.shape, key
        assert torch.equal(read[key], tensor), key


def test_read_tensors_keeps_the_dtype_of_empty_tensors(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({"ids": torch.zeros(0, 3, dtype=torch.int64)}, path)
    (key, tensor), = read_tensors(path)
    assert tensor.shape == (0, 3) and tensor.dtype == torch.int64


def test_a_folder_without_safetensors_falls_back_to_from_pretrained(tmp_path, tokenizer):
    model = llama(vocab_size=len(tokenizer))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert safetensors_files(tmp_path) == []
    loaded, _ = load_model(str(tmp_path), "causal-lm", quantize="nf4")
    quantize_model(model, "nf4")
    assert_same_model(loaded, model, input_ids(len(tokenizer)))


def test_without_safetensors_the_layers_are_still_checked_before_loading(tmp_path, tokenizer, no_from_pretrained):
    model = llama(vocab_size=len(tokenizer), hidden_size=40, intermediate_size=80, num_attention_heads=2,
                  num_key_value_heads=1)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(QuantizationError, match=r"layer 'model\.layers\.0\.self_attn\.k_proj'"):
        load_model(str(tmp_path), "causal-lm", quantize="nf4")  # from_pretrained would fail the test


def test_a_shape_that_disagrees_with_the_config_is_named_before_loading(llama_folder, tmp_path, no_from_pretrained):
    folder = copy_folder(llama_folder, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 192  # the files hold 128-wide MLPs
    (folder / "config.json").write_text(json.dumps(config))
    mismatch = r"has shape (\(128, 64\), the model expects \(192, 64\)|\(64, 128\), the model expects \(64, 192\))"
    with pytest.raises(ModelLoadError, match=mismatch):
        load_model(str(folder), "causal-lm", quantize="nf4")


def test_keys_that_need_renaming_load_through_transformers(llama_folder, tmp_path, tokenizer):
    """A file key with no parameter of that name: stream nothing, let from_pretrained do its renaming."""
    folder = copy_folder(llama_folder, tmp_path / "model")
    extra = folder / "extra.safetensors"
    save_file({"model.layers.0.mlp.legacy_scale": torch.ones(3)}, str(extra))
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.mlp.legacy_scale"] = extra.name
    index_path.write_text(json.dumps(index))
    with pytest.warns(UserWarning, match="legacy_scale.*loading in full precision, then quantizing"):
        model = streamed(folder, "causal-lm", "nf4")
    reference = in_memory_reference(llama_folder, "causal-lm", "nf4")
    assert_same_model(model, reference, input_ids(len(tokenizer)))
