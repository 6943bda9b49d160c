"""Gated MLPs that keep two intermediates instead of four, and norms' outputs kept as recipes: the same values and
gradients as the model's own forward, bit for bit with SiLU and within fp32 rounding for another activation, and
less saved per layer."""

import contextlib
import io
import unittest.mock
import weakref

import pytest
import torch
from tiny_models import gpt2, input_ids, llama, mistral

from loratune.core.adapters import add_adapter
from loratune.core.lora_config import LoraConfig
from loratune.train.saved_activations import GatedProduct, save_less
from loratune.train.step import batch_loss

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
    assert save_less(patched).gated_mlps == LAYERS
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
    save_less(patched)
    tokens = 2 * 12
    assert saved_bytes(plain) - saved_bytes(patched) == LAYERS * tokens * config.intermediate_size * 4


def test_only_plain_gated_mlps_change_and_twice_changes_nothing():
    model = adapted()
    norms = 2 * LAYERS + 1  # two per layer and the final one
    assert save_less(model) == (LAYERS, norms)
    assert save_less(model) == (0, 0)
    assert save_less(mistral()).gated_mlps == LAYERS  # another family's class, the same forward
    assert save_less(gpt2()) == (0, norms)  # its MLP is not gated; its norms are LayerNorms
    assert save_less(llama(hidden_act="prelu")).gated_mlps == 0  # an activation with a parameter to train
    assert saved_bytes(adapted()) > saved_bytes(model)  # the class, and so a model built after, left alone


def test_a_patched_model_pickles_and_still_saves_less():
    model = adapted()
    save_less(model)
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


def test_through_the_training_loss_products_and_norm_outputs_are_not_kept_and_gradients_are_bit_for_bit():
    """Inside `batch_loss` the gated products and the layers' norm outputs (the inputs the LoRA layers after them
    save) are kept as recipes: none outlives the forward while the graph does (outside it, all do), and the
    gradients are those of the model without recipes, bit for bit."""
    model = adapted()
    save_less(model)
    batch = {"input_ids": input_ids(batch=2, length=12)}
    batch["attention_mask"], batch["labels"] = torch.ones_like(batch["input_ids"]), batch["input_ids"]
    params = [p for p in model.parameters() if p.requires_grad]

    def run(loss_fn):
        kept = []
        hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: kept.append(weakref.ref(args[0])))
                 for layer in model.model.layers]
        hooks += [norm.register_forward_hook(lambda m, args, out: kept.append(weakref.ref(out)))
                  for layer in model.model.layers for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
        loss = loss_fn()
        alive = sum(ref() is not None for ref in kept)
        for hook in hooks:
            hook.remove()
        return loss, alive, torch.autograd.grad(loss, params)

    loss, alive, grads = run(lambda: batch_loss(model, batch, "causal-lm")[0])
    with unittest.mock.patch("loratune.train.step.recomputing_saves", contextlib.nullcontext):
        loss_kept, alive_kept, grads_kept = run(lambda: batch_loss(model, batch, "causal-lm")[0])
    assert (alive, alive_kept) == (0, 3 * LAYERS)
    assert torch.equal(loss, loss_kept)
    for mine, reference in zip(grads, grads_kept):
        assert torch.equal(mine, reference)
