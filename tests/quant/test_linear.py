"""QuantLinear: a frozen layer that dequantizes in forward and backward, alone and under a LoRA adapter."""

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from quant_tools import input_ids, llama
from torch import nn
from transformers.pytorch_utils import Conv1D

import loratune.quant.linear as linear_module
from loratune import LoraConfig, MergeError, add_adapter
from loratune.core.adapters import lora_layers
from loratune.core.layers import LoraLinear, module_device
from loratune.errors import QuantizationError
from loratune.quant import QuantLinear, dequantize, quantize, quantize_model

FORMATS = [("nf4", True), ("nf4", False), ("int8", True)]


def dense_and_quantized(format="nf4", double_quant=True, bias=True, in_features=128, out_features=64, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        if bias:
            dense.bias.normal_()
    return dense, QuantLinear.from_linear(dense, format, double_quant)


def inputs(*shape, seed=1, requires_grad=False):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(requires_grad)


@pytest.mark.parametrize("format,double_quant", FORMATS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_the_dense_layer_with_the_dequantized_weight(format, double_quant, bias):
    dense, layer = dense_and_quantized(format, double_quant, bias)
    x = inputs(3, 5, 128)
    weight = layer.dequantize(torch.float32)
    expected = F.linear(x, weight, dense.bias)
    out = layer(x)
    assert out.shape == (3, 5, 64) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # and it is a quantization of the original weight, not something else of the right shape
    assert 0 < ((weight - dense.weight).norm() / dense.weight.norm()).item() < 0.15


@pytest.mark.parametrize("format,double_quant", FORMATS)
def test_bf16_autocast_forward_stays_within_bf16_rounding(format, double_quant):
    dense, layer = dense_and_quantized(format, double_quant)
    x = inputs(4, 128)
    expected = F.linear(x, layer.dequantize(torch.float32), dense.bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().mean().item())
    assert ((out.float() - expected).norm() / expected.norm()).item() < 1e-2


@pytest.mark.parametrize("format,double_quant", FORMATS)
def test_backward_gives_the_input_gradient_of_the_dequantized_dense_layer(format, double_quant):
    dense, layer = dense_and_quantized(format, double_quant)
    reference = nn.Linear(128, 64)
    with torch.no_grad():
        reference.weight.copy_(layer.dequantize(torch.float32))
        reference.bias.copy_(dense.bias)
    upstream = inputs(2, 3, 64, seed=2)
    x, x_ref = inputs(2, 3, 128, requires_grad=True), inputs(2, 3, 128, requires_grad=True)
    (layer(x) * upstream).sum().backward()
    (reference(x_ref) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert layer.bias.grad is None  # frozen

    x_bf16 = inputs(2, 3, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x_bf16)
    (out.float() * upstream).sum().backward()
    assert x_bf16.grad.dtype == torch.float32
    assert ((x_bf16.grad - x_ref.grad).norm() / x_ref.grad.norm()).item() < 1e-2


def test_autograd_keeps_no_dense_copy_of_the_weight():
    _, layer = dense_and_quantized("nf4")
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    x = inputs(8, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    assert (64, 128) not in saved and (128, 64) not in saved
    out.sum().backward()
    assert x.grad.shape == (8, 128)


@pytest.mark.parametrize("format,double_quant", FORMATS)
def test_the_layer_holds_no_weight_parameter_and_nothing_trainable(format, double_quant):
    _, layer = dense_and_quantized(format, double_quant)
    assert isinstance(layer, nn.Linear)  # found by LoRA targeting and all-linear
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    assert not any(p.requires_grad for p in layer.parameters())
    double = format == "nf4" and double_quant  # int8 has one fp32 scale per row, nothing to double-quantize
    buffers = {"data", "scales", "scale_scales", "scale_mean"} if double else {"data", "scales"}
    assert {name for name, _ in layer.named_buffers()} == buffers
    assert set(layer.state_dict()) == buffers | {"bias"}
    assert layer.data.dtype == (torch.uint8 if format == "nf4" else torch.int8)
    # `weight` reads as a fresh dequantized tensor in the dense layer's dtype, never a stored parameter
    weight = layer.weight
    assert weight.dtype == torch.float32 and torch.equal(weight, layer.dequantize(torch.float32))
    weight.zero_()
    assert layer.weight.abs().sum() > 0
    assert f"format={format}" in repr(layer)


def test_state_dict_round_trips_into_a_fresh_layer():
    _, layer = dense_and_quantized("nf4")
    _, other = dense_and_quantized("nf4", seed=5)
    other.load_state_dict(layer.state_dict())
    x = inputs(4, 128)
    assert torch.equal(other(x), layer(x))


def test_conv1d_is_quantized_in_out_in_layout():
    torch.manual_seed(0)
    conv = Conv1D(48, 128)  # nf=48 outputs, nx=128 inputs; weight stored (in, out)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    layer = QuantLinear.from_linear(conv, "nf4")
    assert (layer.out_features, layer.in_features) == (48, 128)
    reference = Conv1D(48, 128)
    with torch.no_grad():
        reference.weight.copy_(layer.dequantize(torch.float32).t())
        reference.bias.copy_(conv.bias)
    x = inputs(2, 5, 128)
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)
    assert 0 < ((layer(x) - conv(x)).norm() / conv(x).norm()).item() < 0.15  # close to the original Conv1D


def test_from_linear_names_the_layer_it_cannot_quantize():
    with pytest.raises(QuantizationError, match=r"layer 'encoder.proj': nf4 .* got shape \(10, 10\)"):
        QuantLinear.from_linear(nn.Linear(10, 10), "nf4", where="layer 'encoder.proj'")


def test_store_replaces_the_weight_in_the_same_format():
    _, layer = dense_and_quantized("nf4", double_quant=True)
    new = inputs(64, 128, seed=9)
    layer.store(new)
    assert torch.equal(layer.dequantize(torch.float32), dequantize(quantize(new, "nf4", True), torch.float32))
    assert layer.scales.dtype == torch.int8 and layer.format == "nf4"


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("format", ["nf4", "int8"])
def test_lora_gradients_match_a_dense_model_with_the_dequantized_weights(format):
    model = llama()
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    dense = copy.deepcopy(model)
    report = quantize_model(model, format)
    assert report.layers == 14
    for path, layer in lora_layers(model):
        assert isinstance(layer.base_layer, QuantLinear), path
        with torch.no_grad():
            dense.get_submodule(path).base_layer.weight.copy_(layer.base_layer.dequantize(torch.float32))
    ids = input_ids()
    losses = [m(input_ids=ids, labels=ids).loss for m in (model, dense)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    quantized, reference = lora_grads(model), lora_grads(dense)
    assert quantized.keys() == reference.keys() and len(quantized) == 28  # A and B of 14 layers
    assert all("lora_" in name for name in quantized)
    for name, grad in reference.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(quantized[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def single_layer_model(format="nf4"):
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(proj=nn.Linear(64, 64)))
    quantize_model(model, format)
    return model


def test_a_lora_layer_dequantizes_once_in_forward_and_once_in_backward_only_if_needed(monkeypatch):
    model = single_layer_model()
    calls = []
    real = linear_module.dequantize

    def counting(q, dtype=torch.bfloat16, *args, **kwargs):
        calls.append(dtype)
        return real(q, dtype, *args, **kwargs)

    monkeypatch.setattr(linear_module, "dequantize", counting)
    add_adapter(model, LoraConfig(r=4, target_modules=["proj"]))
    assert calls == []  # creating the adapter never reads the quantized weight
    assert module_device(model.proj.base_layer) == torch.device("cpu")
    model(inputs(3, 64)).sum().backward()
    assert calls == [torch.float32]  # the input takes no gradient: the frozen base needs no backward
    assert model.proj.lora_A["default"].weight.grad is not None
    calls.clear()
    x = inputs(3, 64, requires_grad=True)  # as for a layer deeper in a network
    model(x).sum().backward()
    assert calls == [torch.float32, torch.float32] and x.grad is not None


def test_lora_over_a_quantized_base_refuses_to_merge_in_place_and_stores_through_quant():
    model = single_layer_model()
    add_adapter(model, LoraConfig(r=4, target_modules=["proj"], init_lora_weights=False))
    layer = model.proj
    assert isinstance(layer, LoraLinear) and not layer.transposed
    before = layer.base_layer.data.clone()
    with pytest.raises(MergeError, match="merge_quantized"):
        layer.merge(["default"])
    assert layer.merged == [] and torch.equal(layer.base_layer.data, before)
    new = inputs(64, 64, seed=4)
    layer.set_base_weight_oi(new)
    assert isinstance(layer.base_layer, QuantLinear)
    assert torch.equal(layer.base_layer.dequantize(torch.float32),
                      dequantize(quantize(new, "nf4"), torch.float32))


def test_a_quantized_parameter_dequantizes():
    torch.manual_seed(0)
    dense = nn.Linear(64, 64)
    expected = dequantize(quantize(dense.weight.detach(), "nf4"), torch.float32)
    layer = QuantLinear(quantize(dense.weight, "nf4"), dense.bias)  # the parameter itself, not .detach()
    x = inputs(2, 64)
    torch.testing.assert_close(layer(x), F.linear(x, expected, dense.bias))  # (forward runs without grad)
    assert torch.equal(layer.dequantize(torch.float32), expected)


def test_a_first_call_in_inference_mode_does_not_spoil_later_training():
    import loratune.quant.linear as linear_module

    linear_module._LOCAL.__dict__.clear()  # fresh buffers, made under inference mode below
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(64, 64), "nf4")
    x = inputs(2, 64)
    with torch.inference_mode():
        expected = layer(x)
    x.requires_grad_(True)
    out = layer(x)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected)
    assert x.grad is not None
