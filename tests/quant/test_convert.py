"""Whole-model conversion: which layers are quantized, the report, LoftQ, PiSSA over NF4, and merging back."""

import copy
import math
from collections import OrderedDict

import pytest
import torch
from quant_tools import bert, gpt2, input_ids, llama, logits, relative
from torch import nn
from transformers.pytorch_utils import Conv1D

from loratune import LoraConfig, MergeError, add_adapter, merge
from loratune.core.adapters import lora_layers
from loratune.core.errors import TargetError
from loratune.core.layers import LoraLinear, ModulesToSave
from loratune.errors import QuantizationError
from loratune.quant import QuantLinear, check_model_quantizable, dequantize, merge_quantized, quantize, quantize_model
from loratune.quant.convert import quantizable_layers

BODY = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"]
LLAMA_BODY = [f"model.layers.{i}.{name}" for i in range(2) for name in BODY]


def dense_weights(model):
    return {p: m.weight.detach().clone() for p, m in model.named_modules() if p in LLAMA_BODY}


@pytest.mark.parametrize("format,double_quant", [("nf4", True), ("nf4", False), ("int8", True)])
def test_every_linear_but_the_lm_head_is_quantized_and_the_report_adds_up(format, double_quant):
    model = llama()
    original = copy.deepcopy(model)
    weights = dense_weights(model)
    model.train()
    report = quantize_model(model, format, double_quant)
    assert model.lm_head.__class__ is nn.Linear and torch.equal(model.lm_head.weight, original.lm_head.weight)
    converted = [p for p, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert converted == LLAMA_BODY and report.layers == 14
    assert all(model.get_submodule(p).training for p in converted)  # train/eval mode carried over
    assert torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight)

    assert report.dense_bytes == sum(w.numel() * 4 for w in weights.values())
    assert report.quantized_bytes == sum(b.numel() * b.element_size() for p in converted
                                         for b in model.get_submodule(p).buffers())
    error_sq = sum((w - model.get_submodule(p).dequantize(torch.float32)).square().sum().item()
                   for p, w in weights.items())
    expected = math.sqrt(error_sq / sum(w.square().sum().item() for w in weights.values()))
    assert report.relative_error == pytest.approx(expected, rel=1e-6)
    assert report.relative_error_without_loftq is None
    if format == "nf4":
        assert report.quantized_bytes < report.dense_bytes / 6
        assert 0.05 < report.relative_error < 0.15
    else:
        assert report.dense_bytes / 4.2 < report.quantized_bytes < report.dense_bytes / 3.5
        assert 0.001 < report.relative_error < 0.02
    ids = input_ids()
    assert relative(logits(model.eval(), ids), logits(original, ids)) < 2 * report.relative_error


def test_gpt2_conv1d_layers_are_quantized_and_the_tied_head_stays_tied():
    model = gpt2()
    original = copy.deepcopy(model)
    report = quantize_model(model, "nf4")
    assert report.layers == 8  # c_attn, c_proj, c_fc, mlp.c_proj per block
    for path, module in original.named_modules():
        if isinstance(module, Conv1D):
            layer = model.get_submodule(path)
            assert isinstance(layer, QuantLinear), path
            assert (layer.in_features, layer.out_features) == tuple(module.weight.shape)
            assert relative(layer.dequantize(torch.float32), module.weight.t()) < 0.15
            assert torch.equal(layer.bias, module.bias)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    ids = input_ids()
    assert relative(logits(model, ids), logits(original, ids)) < 0.2


def test_classifier_heads_and_modules_to_save_stay_dense():
    model = bert()
    add_adapter(model, LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                                  task_type="SEQ_CLS"))
    quantize_model(model, "nf4")
    assert isinstance(model.classifier, ModulesToSave)
    assert all(type(m) is nn.Linear for m in model.classifier.modules() if isinstance(m, nn.Linear))
    assert isinstance(model.bert.pooler.dense, QuantLinear)
    layer = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer, LoraLinear) and isinstance(layer.base_layer, QuantLinear)
    assert type(layer.lora_A["default"]) is nn.Linear  # the adapter itself is never quantized


def loftq_model(target_modules="all-linear", seed=0):
    model = llama(seed)
    add_adapter(model, LoraConfig(r=8, lora_alpha=16, target_modules=target_modules))
    return model


def total_error(model, weights):
    """||W - (W_q + s * B @ A)|| / ||W|| over the listed layers, computed from the model as it is."""
    error_sq = norm_sq = 0.0
    for path, weight in weights.items():
        module = model.get_submodule(path)
        restored = module.base_layer.dequantize(torch.float32) if isinstance(module, LoraLinear) else \
            module.dequantize(torch.float32)
        if isinstance(module, LoraLinear):
            restored = restored + module.delta_weight("default")
        error_sq += (weight - restored).square().sum().item()
        norm_sq += weight.square().sum().item()
    return math.sqrt(error_sq / norm_sq)


def test_loftq_starts_closer_to_the_full_precision_model():
    ids = input_ids()
    reference = llama()
    full = logits(reference, ids)
    weights = dense_weights(reference)

    plain = loftq_model()
    plain_report = quantize_model(plain, "nf4")
    torch.manual_seed(0)
    model = loftq_model()
    report = quantize_model(model, "nf4", loftq_iterations=2)

    assert report.relative_error_without_loftq == pytest.approx(plain_report.relative_error, rel=1e-9)
    assert report.relative_error < 0.9 * report.relative_error_without_loftq
    assert report.relative_error == pytest.approx(total_error(model, weights), rel=1e-4)
    for _, layer in lora_layers(model):
        assert layer.lora_B["default"].weight.abs().max() > 0  # the adapter now carries the top residual
    assert relative(logits(model, ids), full) < relative(logits(plain, ids), full)


def test_loftq_error_counts_the_layers_without_an_adapter_too():
    reference = llama()
    weights = dense_weights(reference)
    model = loftq_model(target_modules=["q_proj"])
    report = quantize_model(model, "nf4", loftq_iterations=2)
    assert report.relative_error == pytest.approx(total_error(model, weights), rel=1e-4)


def test_merge_refuses_a_quantized_base():
    model = llama()
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    quantize_model(model, "nf4")
    ids = input_ids()
    before = logits(model, ids)
    with pytest.raises(MergeError, match="merge_quantized"):
        merge(model)
    assert all(layer.merged == [] for _, layer in lora_layers(model))
    assert torch.equal(logits(model, ids), before)


def adapted_quantized(target_modules="all-linear"):
    model = llama()
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False))
    quantize_model(model, "nf4")
    return model


def test_merge_quantized_keeps_outputs_and_removes_lora():
    model = adapted_quantized()
    ids = input_ids()
    before = logits(model, ids)
    with torch.no_grad():
        expected = {p: layer.base_layer.dequantize(torch.float32) + layer.delta_weight("default")
                    for p, layer in lora_layers(model)}
    report = merge_quantized(model, requantize=False, dtype=torch.float32)
    assert report.layers == 14 and not report.requantized
    assert report.relative_error < 1e-7
    assert not list(lora_layers(model)) and not any("lora_" in key for key in model.state_dict())
    assert not any(isinstance(m, (QuantLinear, LoraLinear)) for m in model.modules())
    for path, weight in expected.items():
        layer = model.get_submodule(path)
        assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32
        assert not layer.weight.requires_grad
        torch.testing.assert_close(layer.weight, weight, rtol=0, atol=0)
    assert (logits(model, ids) - before).abs().max() < 1e-4


def test_merge_quantized_into_bf16_reports_the_rounding():
    model = adapted_quantized()
    report = merge_quantized(model, dtype=torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert 1e-4 < report.relative_error < 4e-3  # bf16 keeps 8 significant bits


def test_merge_quantized_with_requantize_stores_the_merged_weight_quantized():
    model = adapted_quantized()
    with torch.no_grad():
        expected = {p: layer.base_layer.dequantize(torch.float32) + layer.delta_weight("default")
                    for p, layer in lora_layers(model)}
    report = merge_quantized(model, requantize=True)
    assert report.requantized and report.layers == 14
    assert 0.01 < report.relative_error < 0.15
    for path, merged in expected.items():
        layer = model.get_submodule(path)
        assert isinstance(layer, QuantLinear) and layer.format == "nf4" and layer.double_quant
        assert torch.equal(layer.dequantize(torch.float32), dequantize(quantize(merged, "nf4"), torch.float32))
    assert not list(lora_layers(model))


def test_merge_quantized_also_merges_lora_over_dense_layers():
    model = adapted_quantized(target_modules=["q_proj", "lm_head"])
    head = model.lm_head
    expected_head = head.base_layer.weight.detach() + head.delta_weight("default").detach()
    ids = input_ids()
    before = logits(model, ids)
    report = merge_quantized(model, dtype=torch.float32)
    assert report.layers == 2  # q_proj of both blocks; the dense head is merged by unload
    assert type(model.lm_head) is nn.Linear
    torch.testing.assert_close(model.lm_head.weight, expected_head)
    assert (logits(model, ids) - before).abs().max() < 1e-4


def test_merge_quantized_needs_lora_over_quantized_layers():
    model = llama()
    quantize_model(model, "nf4")
    with pytest.raises(QuantizationError, match="no LoRA layers over quantized weights"):
        merge_quantized(model)


def test_a_model_without_quantizable_linear_layers_is_refused():
    no_linear = nn.Sequential(nn.Embedding(10, 64), nn.LayerNorm(64))
    with pytest.raises(QuantizationError, match="nf4: the model has no linear layers to quantize"):
        quantize_model(no_linear, "nf4")
    only_a_head = nn.Module()
    only_a_head.embed, only_a_head.lm_head = nn.Embedding(10, 64), nn.Linear(64, 10)
    with pytest.raises(QuantizationError, match="no linear layers"):
        quantize_model(only_a_head, "int8")
    assert type(only_a_head.lm_head) is nn.Linear


def test_a_layer_nf4_cannot_store_stops_the_conversion_before_it_starts():
    model = nn.Sequential(OrderedDict(first=nn.Linear(64, 64), odd=nn.Linear(10, 10)))
    with pytest.raises(QuantizationError, match=r"layer 'odd': nf4 needs a weight size divisible by 64"):
        quantize_model(model, "nf4")
    assert type(model.first) is nn.Linear  # nothing was converted
    assert list(check_model_quantizable(model, "int8")) == ["first", "odd"]
    quantize_model(model, "int8")
    assert isinstance(model.odd, QuantLinear)
    assert quantizable_layers(model) == {}  # already quantized layers are not converted again


def test_pissa_on_a_quantized_model_stores_the_residual_back_quantized():
    model = llama()
    quantize_model(model, "nf4")
    ids = input_ids()
    before = logits(model, ids)
    bases = {p: m for p, m in model.named_modules() if isinstance(m, QuantLinear)}
    weights = {p: m.dequantize(torch.float32) for p, m in bases.items()}
    codes = {p: m.data.clone() for p, m in bases.items()}
    add_adapter(model, LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", init_lora_weights="pissa"))
    for path, layer in lora_layers(model):
        assert layer.base_layer is bases[path]  # the same layer, its codes replaced by `store`
        assert not torch.equal(layer.base_layer.data, codes[path])
        delta = layer.delta_weight("default")
        residual = weights[path] - delta
        assert relative(delta, weights[path]) > 0.2  # the adapter took the top singular directions
        # base + adapter reproduces the weight up to the NF4 error of the (smaller) residual
        restored = layer.base_layer.dequantize(torch.float32) + delta
        assert relative(restored, weights[path]) < 0.15 * residual.norm().item() / weights[path].norm().item()
    assert relative(logits(model, ids), before) < 0.15


def test_the_layers_inside_a_classification_head_stay_dense():
    """RoBERTa's head is a small MLP (classifier.dense, classifier.out_proj): all of it is the head."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    model = RobertaForSequenceClassification(RobertaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1,
                                                           num_attention_heads=2, intermediate_size=128))
    layers = quantizable_layers(model)
    assert not [p for p in layers if p.startswith("classifier")]
    assert "roberta.encoder.layer.0.attention.self.query" in layers


def test_modules_to_save_over_quantized_layers_is_refused():
    model = bert()
    quantize_model(model, "nf4")
    with pytest.raises(TargetError, match=r"modules_to_save 'bert\.pooler' holds layers stored quantized"):
        add_adapter(model, LoraConfig(r=4, target_modules=["query"], modules_to_save=["pooler"]))
    assert not list(lora_layers(model))  # nothing half-done


def test_merge_quantized_keeps_the_model_dtype_and_gpt2_layout(tmp_path):
    model = gpt2()
    add_adapter(model, LoraConfig(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False))
    quantize_model(model, "nf4")
    ids = input_ids()
    before = logits(model, ids)
    report = merge_quantized(model)  # no dtype given: the layers' own (fp32 here)
    assert report.relative_error < 1e-7
    attn = model.transformer.h[0].attn.c_attn
    assert type(attn) is Conv1D and attn.weight.dtype == torch.float32 and attn.weight.shape == (64, 192)
    assert isinstance(model.transformer.h[0].attn.c_proj, QuantLinear)  # no LoRA there: stays quantized
    torch.testing.assert_close(logits(model, ids), before, atol=1e-4, rtol=1e-4)


def test_a_quantized_gpt2_adapter_records_the_conv1d_layout(tmp_path):
    import json

    from loratune.core.peft_format import save_adapter

    model = gpt2()
    quantize_model(model, "nf4")
    add_adapter(model, LoraConfig(r=4, target_modules=["c_attn"]))
    save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_loftq_is_repeatable_and_leaves_the_global_generator_alone():
    factors = []
    for _ in range(2):
        model = loftq_model()
        torch.manual_seed(123)
        quantize_model(model, "nf4", loftq_iterations=2)
        assert torch.equal(torch.rand(3), torch.manual_seed(123) and torch.rand(3))
        factors.append({k: v.clone() for k, v in model.state_dict().items() if "lora_" in k})
    assert factors[0].keys() == factors[1].keys() and factors[0]
    assert all(torch.equal(factors[0][k], factors[1][k]) for k in factors[0])


def test_loftq_with_a_rank_above_a_layers_smaller_side():
    """k_proj is 32 x 64 here; r=48 is allowed (below the larger side) and LoftQ fills what exists."""
    model = llama()
    weights = dense_weights(model)
    add_adapter(model, LoraConfig(r=48, lora_alpha=48, target_modules=["k_proj"]))
    report = quantize_model(model, "nf4", loftq_iterations=1)
    assert report.relative_error < report.relative_error_without_loftq
    assert total_error(model, weights) == pytest.approx(report.relative_error, rel=1e-4)
