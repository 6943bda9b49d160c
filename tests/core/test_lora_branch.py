"""The LoRA branch as one autograd function: gradients with and without dropout, the in-place sum, the mask's
statistics, and the layer using it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import loratune.core.lora_branch as fused
from loratune.core.layers import LoraLinear
from loratune.core.lora_branch import add_lora_branch, keep_mask, lora_branch


def _reference(x, a, b, mask, keep_scale, scaling):
    return scaling * ((x * mask * keep_scale) @ a.t()) @ b.t()


def test_gradients_match_autograd_of_the_formula_in_double():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 5, 6) > 0.3
    assert torch.autograd.gradcheck(lambda x, a, b: lora_branch(x, a, b, 0.7, keep=(mask, 1 / 0.7)),
                                    (x, a, b))
    out = lora_branch(x, a, b, 0.7, keep=(mask, 1 / 0.7))
    expected = _reference(x, a, b, mask, 1 / 0.7, 0.7)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), (x, a, b))
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, a, b))
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_mask_drops_p_of_the_positions_and_keeps_the_mean(p):
    torch.manual_seed(0)
    keep, keep_scale = keep_mask(torch.Size((1000, 1000)), p, torch.device("cpu"))
    n = keep.numel()
    dropped = 1 - keep.float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(dropped - p) < 5 * sigma + 8e-6  # 8e-6: p is rounded to a multiple of 1/65536
    assert keep_scale == pytest.approx(1 / (1 - p), rel=1e-4)
    assert abs(keep.float().mean().item() * keep_scale - 1) < 6 * sigma / (1 - p)


def test_mask_rows_are_not_correlated_and_draws_follow_the_seed():
    torch.manual_seed(1)
    first, _ = keep_mask(torch.Size((400, 1000)), 0.5, torch.device("cpu"))
    torch.manual_seed(1)
    again, _ = keep_mask(torch.Size((400, 1000)), 0.5, torch.device("cpu"))
    assert torch.equal(first, again)
    second, _ = keep_mask(torch.Size((400, 1000)), 0.5, torch.device("cpu"))
    assert not torch.equal(first, second)
    # neighbouring positions share a 64-bit word: they must still be independent
    agree = (first[:, :-1] == first[:, 1:]).float().mean().item()
    assert abs(agree - 0.5) < 0.01


def test_no_dropout_at_p_zero_and_no_division_by_zero_near_one():
    keep, keep_scale = keep_mask(torch.Size((64, 64)), 0.0, torch.device("cpu"))
    assert bool(keep.all()) and keep_scale == 1.0
    keep, keep_scale = keep_mask(torch.Size((64, 64)), 0.999999, torch.device("cpu"))
    assert keep_scale == 65536.0


def _layer(p: float) -> LoraLinear:
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(6, 4))
    layer.create("a", 3, 0.5, p, False)
    layer.active = ["a"]
    return layer.train()


def test_training_layer_uses_the_drawn_mask_for_output_and_gradients(monkeypatch):
    layer = _layer(0.25)
    x = torch.randn(2, 5, 6, requires_grad=True)
    mask = torch.rand(2, 5, 6) > 0.25
    monkeypatch.setattr(fused, "keep_mask", lambda shape, p, device: (mask, 1 / 0.75))
    out = layer(x)
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    expected = layer.base_layer(x) + _reference(x, a, b, mask, 1 / 0.75, 0.5)
    assert torch.allclose(out, expected, atol=1e-6)
    got = torch.autograd.grad(out.sum(), (x, a, b))
    want = torch.autograd.grad(expected.sum(), (x, a, b))
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5)


def test_bf16_input_with_fp32_adapter_returns_gradients_in_each_dtype():
    layer = _layer(0.1)
    layer.base_layer.to(torch.bfloat16)
    x = torch.randn(3, 6, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert layer.lora_A["a"].weight.grad.dtype == torch.float32


def test_autocast_runs_the_branch_in_bf16_close_to_fp32(monkeypatch):
    layer = _layer(0.2)
    x = torch.randn(4, 6)
    mask = torch.rand(4, 6) > 0.2
    monkeypatch.setattr(fused, "keep_mask", lambda shape, p, device: (mask, 1 / 0.8))
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    fp32 = layer(x)
    grads32 = torch.autograd.grad(fp32.sum(), (a, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x)
    grads16 = torch.autograd.grad(low.float().sum(), (a, b))
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), fp32, rtol=3e-2, atol=3e-2)
    for g16, g32 in zip(grads16, grads32):
        assert g16.dtype == torch.float32 and torch.allclose(g16, g32, rtol=3e-2, atol=3e-2)


def test_without_dropout_the_branch_and_its_in_place_sum_match_the_formula_in_double():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)  # a base weight that trains, to see its gradient
    assert torch.autograd.gradcheck(lambda x, a, b: lora_branch(x, a, b, 0.7), (x, a, b))
    assert torch.autograd.gradcheck(lambda x, a, b, w: add_lora_branch(x @ w.t(), x, a, b, 0.7), (x, a, b, w))
    expected = x @ w.t() + 0.7 * (x @ a.t()) @ b.t()
    base = x @ w.t()
    out = add_lora_branch(base, x, a, b, 0.7)
    assert out is base  # the layer's fresh output took the sum in place
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), (x, a, b, w))
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), (x, a, b, w))):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)


def test_a_result_of_another_dtype_or_layout_is_summed_out_of_place():
    torch.manual_seed(0)
    x, a, b = torch.randn(5, 6), torch.randn(3, 6), torch.randn(4, 3)
    wide = torch.randn(4, 5).t()  # not contiguous
    low = torch.randn(5, 4, dtype=torch.bfloat16)  # the base's dtype, not the adapter's
    for result in (wide, low):
        before = result.clone()
        out = add_lora_branch(result, x, a, b, 0.5)
        assert torch.equal(result, before) and out.dtype == result.dtype
        assert torch.allclose(out.float(), before.float() + 0.5 * (x @ a.t()) @ b.t(), rtol=1e-2, atol=1e-2)


def test_every_layer_but_dora_runs_the_branch(monkeypatch):
    import loratune.core.layers as layers

    calls = []
    monkeypatch.setattr(layers, "add_lora_branch", lambda result, x, a, b, scaling, p: calls.append(p) or result)
    x = torch.randn(3, 6)
    layer = _layer(0.25)
    layer.eval()(x)
    _layer(0.0)(x)  # nn.Identity: no dropout
    _layer(0.25)(x)
    assert calls == [0.0, 0.0, 0.25]
    dora = _layer(0.25)
    dora.enable_dora("a")
    dora(x)
    assert len(calls) == 3


def test_bf16_input_gives_the_fp32_reference_values(monkeypatch):
    layer = _layer(0.2)
    x = torch.randn(4, 6).to(torch.bfloat16).requires_grad_()
    mask = torch.rand(4, 6) > 0.2
    monkeypatch.setattr(fused, "keep_mask", lambda shape, p, device: (mask, 1 / 0.8))
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    out = lora_branch(x, a, b, 0.5, 0.2)
    x32 = x.detach().float().requires_grad_()
    expected = _reference(x32, a, b, mask, 1 / 0.8, 0.5)
    assert out.dtype == torch.float32  # computed in the adapter's dtype; the layer casts to the base's
    assert torch.allclose(out, expected, atol=1e-6)
    (gx,) = torch.autograd.grad(out.sum(), (x,))
    (gx32,) = torch.autograd.grad(expected.sum(), (x32,))
    assert gx.dtype == torch.bfloat16 and torch.allclose(gx.float(), gx32, rtol=1e-2, atol=1e-2)


def test_gradient_checkpointing_recomputes_the_same_masks():
    import tiny_models as tm

    from loratune import LoraConfig, add_adapter

    grads = []
    for checkpointing in (False, True):
        model = tm.llama()
        add_adapter(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules="all-linear",
                                      init_lora_weights=False))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(5)
        ids = tm.input_ids()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert all(torch.allclose(g0, g1, atol=1e-6) for g0, g1 in zip(*grads))
    assert any(g.abs().max() > 0 for g in grads[0])


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_base_and_branch_as_one_node_match_the_formula_in_double(transposed, with_bias):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64)
    bias = torch.randn(4, dtype=torch.float64) if with_bias else None
    stored = w.t().contiguous() if transposed else w  # Conv1D keeps (in, out)
    mask = torch.rand(2, 5, 6) > 0.3
    for keep in (None, (mask, 1 / 0.7)):
        def node(x, a, b, keep=keep):
            return fused.lora_linear(x, stored, bias, a, b, 0.7, keep=keep, transposed=transposed)
        assert torch.autograd.gradcheck(node, (x, a, b))
        dropped = x if keep is None else x * mask / 0.7
        expected = x @ w.t() + (0 if bias is None else bias) + 0.7 * (dropped @ a.t()) @ b.t()
        out = node(x, a, b)
        assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad(out.square().sum(), (x, a, b))
        for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), (x, a, b))):
            assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)


def _frozen_layer(base: nn.Module, p: float) -> LoraLinear:
    torch.manual_seed(0)
    base.requires_grad_(False)
    layer = LoraLinear(base)
    layer.create("a", 3, 0.5, p, False)
    layer.active = ["a"]
    return layer.train()


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("make_base", [lambda: nn.Linear(6, 4), lambda: nn.Linear(6, 4, bias=False),
                                       lambda: __import__("transformers").pytorch_utils.Conv1D(4, 6)])
def test_a_frozen_layer_runs_as_one_node_with_the_two_node_values(monkeypatch, make_base, p):
    import loratune.core.layers as layers

    layer = _frozen_layer(make_base(), p)
    x = torch.randn(2, 5, 6, requires_grad=True)
    g = torch.randn(2, 5, 4)
    runs = []
    for one_node in (True, False):
        monkeypatch.setattr(layers, "FUSE_BASE", one_node)
        torch.manual_seed(1)  # the same dropout mask both times
        out = layer(x)
        out.backward(g)
        runs.append((type(out.grad_fn).__name__, out.detach(), x.grad, layer.lora_A["a"].weight.grad,
                     layer.lora_B["a"].weight.grad))
        x.grad = None
        layer.zero_grad()
    assert runs[0][0] == "_LoraLinearBackward" and runs[1][0] != "_LoraLinearBackward"
    for got, want in zip(runs[0][1:], runs[1][1:]):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


def test_a_layer_runs_as_two_nodes_where_one_would_differ():
    x = torch.randn(3, 6)

    def node(layer: LoraLinear) -> str:
        return type(layer(x).grad_fn).__name__

    assert node(_frozen_layer(nn.Linear(6, 4), 0.0)) == "_LoraLinearBackward"
    assert node(_layer(0.0)) != "_LoraLinearBackward"  # a base weight that trains
    hooked = _frozen_layer(nn.Linear(6, 4), 0.0)
    seen = []
    hooked.base_layer.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    assert node(hooked) != "_LoraLinearBackward" and seen == [torch.Size((3, 4))]  # the base's hook still runs
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: seen.append(type(module)))
    try:
        assert node(_frozen_layer(nn.Linear(6, 4), 0.0)) != "_LoraLinearBackward" and nn.Linear in seen
    finally:
        handle.remove()
    two = _frozen_layer(nn.Linear(6, 4), 0.0)
    two.create("b", 2, 1.0, 0.0, False)
    two.active = ["a", "b"]
    assert node(two) != "_LoraLinearBackward"
    dora = _frozen_layer(nn.Linear(6, 4), 0.0)
    dora.enable_dora("a")
    assert node(dora) != "_LoraLinearBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert node(_frozen_layer(nn.Linear(6, 4), 0.0)) != "_LoraLinearBackward"
