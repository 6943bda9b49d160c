"""LoRA layers reading one input, run as one node: the node's gradients, which layers group, the same values
as each layer alone, and the group dropped where the calls stop matching what it learned."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from tiny_models import input_ids, llama
from torch import nn

import loratune.core.layers as layers
from loratune import LoraConfig, add_adapter
from loratune.core.layers import LoraLinear
from loratune.core.shared_input import SharedInput, _LoraLinears


def test_the_node_matches_each_member_s_formula_in_double():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    shapes = [(4, 3), (2, 2), (5, 1)]  # (out, rank) per member
    weights = [torch.randn(o, 6, dtype=torch.float64) for o, _ in shapes]
    biases = [None, torch.randn(2, dtype=torch.float64), None]
    a = [torch.randn(r, 6, dtype=torch.float64, requires_grad=True) for _, r in shapes]
    b = [torch.randn(o, r, dtype=torch.float64, requires_grad=True) for o, r in shapes]
    scales, transposed = (0.5, 2.0, 1.5), (False, True, False)
    stored = [w.t().contiguous() if t else w for w, t in zip(weights, transposed)]

    def node(x, *factors):
        members = zip(stored, biases, factors[:3], factors[3:])
        tensors = [t for w, bias, a_i, b_i in members for t in (w, bias, a_i, b_i)]
        return _LoraLinears.apply(x, scales, transposed, *tensors)

    assert torch.autograd.gradcheck(node, (x, *a, *b))
    outs = node(x, *a, *b)
    for out, w, bias, a_i, b_i, s in zip(outs, weights, biases, a, b, scales):
        expected = x @ w.t() + (0 if bias is None else bias) + s * (x @ a_i.t()) @ b_i.t()
        assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
    # an output no loss reads: its member's factors get no gradient, the others' as if it were absent
    grads = torch.autograd.grad(outs[0].square().sum() + outs[2].sum(), (x, *a, *b), allow_unused=True)
    alone = x @ weights[0].t() + 0.5 * (x @ a[0].t()) @ b[0].t()
    third = x @ weights[2].t() + 1.5 * (x @ a[2].t()) @ b[2].t()
    want = torch.autograd.grad(alone.square().sum() + third.sum(), (x, a[0], a[2], b[0], b[2]))
    for got, expected in zip((grads[0], grads[1], grads[3], grads[4], grads[6]), want):
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10)
    assert grads[2] is None and grads[5] is None


def _model() -> nn.Module:
    model = llama()
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return model.train()


def _groups(model: nn.Module) -> list[list[str]]:
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    found = {id(m.shared_input): m.shared_input for m in model.modules()
             if isinstance(m, LoraLinear) and m.shared_input is not None}
    return sorted(sorted(names[id(member)] for member in group.members) for group in found.values())


def test_layers_called_one_after_another_on_one_input_without_gradients_group_from_the_next_forward():
    model = _model()
    ids = input_ids()
    model(ids)  # with gradients: no group (a checkpointed layer's recomputation must save what it saved)
    assert _groups(model) == []
    with torch.no_grad():
        model(ids)
    layers_count = model.config.num_hidden_layers
    assert _groups(model) == sorted([["k_proj", "q_proj", "v_proj"], ["gate_proj", "up_proj"]] * layers_count)


def test_grouped_layers_give_each_layer_s_own_values_and_gradients(monkeypatch):
    model = _model()
    ids = input_ids()
    with torch.no_grad():
        model(ids)  # the groups form
    runs = []
    for one_node in (True, False):
        monkeypatch.setattr(layers, "FUSE_BASE", one_node)
        logits = model(ids).logits
        logits.square().mean().backward()
        runs.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    assert torch.allclose(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-6)
    assert runs[0][1].keys() == runs[1][1].keys() and len(runs[0][1]) == 2 * 7 * model.config.num_hidden_layers
    for name, grad in runs[0][1].items():
        assert torch.allclose(grad, runs[1][1][name], rtol=1e-4, atol=1e-7), name


def _pair() -> tuple[LoraLinear, LoraLinear]:
    torch.manual_seed(0)
    pair = []
    for out in (4, 3):
        layer = LoraLinear(nn.Linear(6, out).requires_grad_(False))
        layer.create("a", 2, 0.5, 0.0, False)
        layer.active = ["a"]
        pair.append(layer)
    return pair[0], pair[1]


def _alone(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    return layer.base_layer(x) + 0.5 * (x @ a.t()) @ b.t()


def test_a_member_called_on_another_tensor_drops_the_group():
    first, second = _pair()
    x, other = torch.randn(3, 6), torch.randn(3, 6)
    with torch.no_grad():
        first(x), second(x), first(other)  # observed: the two ran on x one after the other
    assert isinstance(first.shared_input, SharedInput) and first.shared_input is second.shared_input
    out = first(x)  # runs both, keeps the second's output for its call on x
    assert torch.allclose(out, _alone(first, x), atol=1e-6)
    assert torch.allclose(second(other), _alone(second, other), atol=1e-6)  # not the output kept for x
    assert first.shared_input is None and second.shared_input is None


def test_a_member_not_called_before_the_group_runs_again_drops_the_group():
    first, second = _pair()
    x, y = torch.randn(3, 6), torch.randn(3, 6)
    with torch.no_grad():
        first(x), second(x), first(y)
    first(x)  # the second's output is kept, but the second is not called
    out = first(y)
    assert torch.allclose(out, _alone(first, y), atol=1e-6)
    assert first.shared_input is None and second.shared_input is None
    assert torch.allclose(second(y), _alone(second, y), atol=1e-6)


@pytest.mark.parametrize("p", [0.3])
def test_with_dropout_active_members_run_alone_and_the_group_stays(p):
    first, second = _pair()
    x = torch.randn(3, 6)
    with torch.no_grad():
        first(x), second(x), first(torch.randn(3, 6))
    group = first.shared_input
    for layer in (first, second):
        layer.add_dropout("a", p)
    torch.manual_seed(3)
    out = first(x)
    assert type(out.grad_fn).__name__ == "_LoraLinearBackward" and not group.kept()
    first.eval(), second.eval()  # dropout off: the group runs
    assert type(first(x).grad_fn).__name__ == "_LoraLinearsBackward" and group.kept()
    assert torch.allclose(second(x), _alone(second, x), atol=1e-6) and first.shared_input is group


def test_the_record_of_calls_keeps_no_model_alive():
    first, second = _pair()
    x = torch.randn(3, 6)
    first(x), second(x)
    gone = weakref.ref(second)
    del second
    gc.collect()
    assert gone() is None


def test_gradient_checkpointing_recomputes_grouped_layers_as_they_ran(monkeypatch):
    model = _model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = input_ids()
    runs = []
    for one_node in (True, False):
        monkeypatch.setattr(layers, "FUSE_BASE", one_node)
        losses = []
        for _ in range(2):  # the groups form in the evaluation between the two steps, none within a step
            loss = model(ids, labels=ids).loss
            loss.backward()
            losses.append(float(loss))
            with torch.no_grad():
                model(ids)
        runs.append((losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    assert _groups(model) != []
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6)
    for name, grad in runs[0][1].items():
        assert torch.allclose(grad, runs[1][1][name], rtol=1e-4, atol=1e-7), name
