"""LoRA layers reading one input, run as one node: the node's gradients, which layers group in a learning pass,
the same values as each layer alone, and each layer alone where the calls stop matching what was learned."""

from __future__ import annotations

import copy
import pickle
import weakref

import pytest
import torch
from tiny_models import input_ids, llama
from torch import nn

import loratune.core.layers as layers
from loratune import LoraConfig, add_adapter
from loratune.core.layers import LoraLinear
from loratune.core.shared_input import SharedInput, _LoraLinears, group_of, learning_shared_inputs


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
    found = {id(group_of(m)): group_of(m) for m in model.modules()
             if isinstance(m, LoraLinear) and group_of(m) is not None}
    return sorted(sorted(names[id(member)] for member in group.members) for group in found.values())


def test_layers_called_one_after_another_on_one_input_group_in_a_learning_pass_only():
    model = _model()
    ids = input_ids()
    with torch.no_grad():
        model(ids)  # outside a learning pass nothing is learned
    assert _groups(model) == []
    with torch.no_grad(), learning_shared_inputs(model):
        model(ids)
    layers_count = model.config.num_hidden_layers
    assert _groups(model) == sorted([["k_proj", "q_proj", "v_proj"], ["gate_proj", "up_proj"]] * layers_count)


def test_grouped_layers_give_each_layer_s_own_values_and_gradients(monkeypatch):
    model = _model()
    ids = input_ids()
    with torch.no_grad(), learning_shared_inputs(model):
        model(ids)
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


def _layers(*outs: int) -> list[LoraLinear]:
    torch.manual_seed(0)
    found = []
    for out in outs:
        layer = LoraLinear(nn.Linear(6, out).requires_grad_(False))
        layer.create("a", 2, 0.5, 0.0, False)
        layer.active = ["a"]
        found.append(layer)
    return found


def _learned(*layers: LoraLinear, calls) -> nn.Module:
    parent = nn.ModuleList(layers)
    with torch.no_grad(), learning_shared_inputs(parent):
        calls()
    return parent


def _grouped_pair() -> tuple[LoraLinear, LoraLinear]:
    """Two layers seen running one after the other on one tensor, then a third on another: a group."""
    first, second, outside = _layers(4, 3, 5)
    x = torch.randn(3, 6)
    _learned(first, second, outside, calls=lambda: (first(x), second(x), outside(torch.randn(3, 6))))
    assert isinstance(group_of(first), SharedInput) and group_of(first) is group_of(second)
    assert group_of(outside) is None
    return first, second


def _alone(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    return layer.base_layer(x) + 0.5 * (x @ a.t()) @ b.t()


def test_a_member_called_on_another_tensor_runs_alone_and_the_group_stays():
    first, second = _grouped_pair()
    group, x, other = group_of(first), torch.randn(3, 6), torch.randn(3, 6)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            out = first(x)  # runs both, keeps the second's output for its call on x
            assert group.kept() and torch.allclose(out, _alone(first, x), atol=1e-6)
            assert torch.allclose(second(other), _alone(second, other), atol=1e-6)  # not the output kept for x
            assert group_of(first) is group and not group.kept()


def test_an_output_left_untaken_is_dropped_when_the_group_runs_again():
    first, second = _grouped_pair()
    group, x, y = group_of(first), torch.randn(3, 6), torch.randn(3, 6)
    first(x)  # the second's output is kept, but the second is not called
    out = first(y)
    assert torch.allclose(out, _alone(first, y), atol=1e-6)
    assert torch.allclose(second(y), _alone(second, y), atol=1e-6) and not group.kept()
    assert type(out.grad_fn).__name__ == "_LoraLinearsBackward"


def test_a_run_that_ends_the_pass_is_grouped_and_layers_under_other_parents_are_not():
    first, second = _layers(4, 3)
    x = torch.randn(3, 6)
    _learned(first, second, calls=lambda: (first(x), second(x)))  # the pass ends: the run closes
    assert group_of(first) is group_of(second) is not None
    for _ in range(3):
        y = torch.randn(3, 6)
        assert torch.allclose(first(y), _alone(first, y), atol=1e-6)
        assert torch.allclose(second(y), _alone(second, y), atol=1e-6)
        assert not group_of(first).kept()
    apart = _layers(4, 3)
    blocks = nn.ModuleList([nn.ModuleList([apart[0]]), nn.ModuleList([apart[1]])])  # a block each, one input
    with torch.no_grad(), learning_shared_inputs(blocks):
        apart[0](x), apart[1](x)
    assert group_of(apart[0]) is None and group_of(apart[1]) is None


@pytest.mark.parametrize("p", [0.3])
def test_with_dropout_active_members_run_alone_and_the_group_stays(p):
    first, second = _grouped_pair()
    group, x = group_of(first), torch.randn(3, 6)
    for layer in (first, second):
        layer.add_dropout("a", p)
    torch.manual_seed(3)
    out = first(x)
    assert type(out.grad_fn).__name__ == "_LoraLinearBackward" and not group.kept()
    first.eval(), second.eval()  # dropout off: the group runs
    assert type(first(x).grad_fn).__name__ == "_LoraLinearsBackward" and group.kept()
    assert torch.allclose(second(x), _alone(second, x), atol=1e-6) and group_of(first) is group


def test_groups_keep_no_layer_alive_and_stop_no_pickle_or_copy():
    first, second = _grouped_pair()
    x = torch.randn(3, 6)
    with torch.no_grad():
        first(x)  # an output kept for the second
    copied = copy.deepcopy(second)
    assert torch.allclose(copied(x), _alone(second, x), atol=1e-6) and group_of(copied) is None
    restored = pickle.loads(pickle.dumps(first))
    assert torch.allclose(restored(x), _alone(first, x), atol=1e-6)
    gone = [weakref.ref(first), weakref.ref(second)]
    del first, second  # no reference cycle: freed at once, without a collection
    assert all(ref() is None for ref in gone)


def test_inference_mode_and_in_place_changes_of_outputs_work_as_before():
    first, second = _grouped_pair()
    x = torch.randn(3, 6)
    with torch.inference_mode():
        inference = torch.randn(3, 6)
        assert torch.allclose(first(inference), _alone(first, inference), atol=1e-6)
        assert torch.allclose(second(inference), _alone(second, inference), atol=1e-6)
    for layer in (first, _layers(4)[0]):  # grouped, then alone
        out = layer(x).relu_()  # an in-place ReLU after the layer, as some models have
        out.sum().backward()
        assert layer.lora_B["a"].weight.grad is not None


def test_a_base_layer_with_a_backward_hook_or_its_own_forward_runs_as_before():
    hooked, replaced = _layers(4, 4)
    seen = []
    hooked.base_layer.register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(module))
    replaced.base_layer.forward = lambda x: torch.zeros(*x.shape[:-1], 4)
    x = torch.randn(3, 6, requires_grad=True)
    assert type(hooked(x).grad_fn).__name__ != "_LoraLinearBackward"
    hooked(x).sum().backward()
    assert seen == [hooked.base_layer]
    a, b = replaced.lora_A["a"].weight, replaced.lora_B["a"].weight
    assert torch.allclose(replaced(x), 0.5 * (x @ a.t()) @ b.t(), atol=1e-6)


def test_gradient_checkpointing_recomputes_grouped_layers_as_they_ran(monkeypatch):
    model = _model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = input_ids()
    runs = []
    for one_node in (True, False):
        monkeypatch.setattr(layers, "FUSE_BASE", one_node)
        losses = []
        for step in range(2):
            if step == 1:  # grouped from the second step on
                with torch.no_grad(), learning_shared_inputs(model):
                    model(ids)
            loss = model(ids, labels=ids).loss
            loss.backward()
            losses.append(float(loss.detach()))
        runs.append((losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    assert _groups(model) != []
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6)
    for name, grad in runs[0][1].items():
        assert torch.allclose(grad, runs[1][1][name], rtol=1e-4, atol=1e-7), name


def test_a_member_with_a_pre_hook_keeps_the_group_from_running():
    first, second = _grouped_pair()
    second.register_forward_pre_hook(lambda module, args: (args[0] * 2,))  # hands the layer another input
    x = torch.randn(3, 6)
    out = first(x)
    assert type(out.grad_fn).__name__ == "_LoraLinearBackward" and not group_of(first).kept()
    assert torch.allclose(second(x), _alone(second, 2 * x), atol=1e-6)
