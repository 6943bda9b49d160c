"""Gated MLPs that keep two intermediates instead of four: the same values and gradients as the model's own
forward, bit for bit with SiLU and within fp32 rounding for another activation, and less saved per layer."""

import io

import pytest
import torch
from tiny_models import gpt2, input_ids, llama, mistral

from loratune.core.adapters import add_adapter
from loratune.core.lora_config import LoraConfig
from loratune.train.gated_mlp import GatedProduct, save_less_in_gated_mlps

LAYERS = 2


def adapted(**overrides):
    model = llama(**overrides)
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return model


def loss_and_grads(model, autocast=False):
    ids = input_ids(batch=2, length=12)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits
    loss = logits.float().pow(2).mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def saved_bytes(model):
    """Bytes autograd keeps for one forward, each storage counted once, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=input_ids(batch=2, length=12)).logits.sum()
    return sum(seen.values())


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_the_patched_mlp_computes_the_same_values_and_gradients(act, autocast):
    plain, patched = adapted(hidden_act=act), adapted(hidden_act=act)
    assert save_less_in_gated_mlps(patched) == LAYERS
    logits, grads = loss_and_grads(plain, autocast)
    patched_logits, patched_grads = loss_and_grads(patched, autocast)
    assert torch.equal(patched_logits, logits)
    for name, grad in grads.items():
        if act == "silu":  # the same aten kernels on the same inputs
            assert torch.equal(patched_grads[name], grad), name
        else:  # the activation's own backward, through autograd.grad
            torch.testing.assert_close(patched_grads[name], grad, rtol=1e-5, atol=1e-7)


def test_each_layer_keeps_one_intermediate_fewer():
    config = llama().config
    plain, patched = adapted(), adapted()
    save_less_in_gated_mlps(patched)
    tokens = 2 * 12
    assert saved_bytes(plain) - saved_bytes(patched) == LAYERS * tokens * config.intermediate_size * 4


def test_only_plain_gated_mlps_change_and_twice_changes_nothing():
    model = adapted()
    assert save_less_in_gated_mlps(model) == LAYERS
    assert save_less_in_gated_mlps(model) == 0
    assert save_less_in_gated_mlps(mistral()) == LAYERS  # another family's class, the same forward
    assert save_less_in_gated_mlps(gpt2()) == 0  # its MLP is not gated
    assert save_less_in_gated_mlps(llama(hidden_act="prelu")) == 0  # an activation with a parameter to train
    assert saved_bytes(adapted()) > saved_bytes(model)  # the class, and so a model built after, left alone


def test_a_patched_model_pickles_and_still_saves_less():
    model = adapted()
    save_less_in_gated_mlps(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(input_ids=input_ids()).logits, model(input_ids=input_ids()).logits)
    assert saved_bytes(loaded) == saved_bytes(model) < saved_bytes(adapted())


@pytest.mark.parametrize("act", [torch.nn.SiLU(), torch.nn.GELU(approximate="tanh")], ids=["silu", "gelu-tanh"])
@pytest.mark.parametrize("trained", ["gate", "up", "both"])
def test_each_input_gets_the_gradient_autograd_would_give(act, trained):
    generator = torch.Generator().manual_seed(0)
    gate, up, weight = (torch.randn(3, 5, generator=generator) for _ in range(3))
    gate.requires_grad_(trained in ("gate", "both"))
    up.requires_grad_(trained in ("up", "both"))
    (GatedProduct.apply(gate, up, act) * weight).sum().backward()
    got = (gate.grad, up.grad)
    gate.grad = up.grad = None
    (act(gate) * up * weight).sum().backward()
    for mine, reference, needed in zip(got, (gate.grad, up.grad), (trained != "up", trained != "gate")):
        assert (mine is not None) == needed
        if needed:
            torch.testing.assert_close(mine, reference, rtol=1e-6, atol=1e-7)
