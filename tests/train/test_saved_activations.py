"""Gated MLPs that keep two intermediates instead of four, and norms' outputs kept as recipes: the same values and
gradients as the model's own forward, bit for bit with SiLU and within fp32 rounding for another activation, and
less saved per layer."""

import contextlib
import io
import unittest.mock

import pytest
import torch
from storage_refs import held, storage_ref
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
    assert save_less(torch.nn.Sequential(torch.nn.BatchNorm1d(4))) == (0, 0)  # running statistics: state
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


def watched(model):
    """Modules whose input (a gated MLP's down projection) or output (a norm) the LoRA layers would save."""
    layers = model.model.layers if hasattr(model, "model") else model.transformer.h
    if hasattr(model, "model"):
        return [layer.mlp.down_proj for layer in layers], [m for layer in layers for m in
                                                           (layer.input_layernorm, layer.post_attention_layernorm)]
    return [], [m for layer in layers for m in (layer.ln_1, layer.ln_2)]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("family", ["llama-silu", "llama-gelu", "gpt2"])
def test_through_the_training_loss_products_and_norm_outputs_are_not_kept_and_gradients_are_bit_for_bit(family,
                                                                                                         autocast):
    """Inside `batch_loss` the gated products and the layers' norm outputs (the inputs the LoRA layers after them
    save) are kept as recipes: in fp32 none outlives the forward while the graph does (outside it, all do), and
    the loss and gradients are those of the model without recipes, bit for bit."""
    if family == "gpt2":
        model = gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    else:
        model = adapted(hidden_act="silu" if family == "llama-silu" else "gelu_pytorch_tanh")
    save_less(model)
    batch = {"input_ids": input_ids(batch=2, length=12)}
    batch["attention_mask"], batch["labels"] = torch.ones_like(batch["input_ids"]), batch["input_ids"]
    params = [p for p in model.parameters() if p.requires_grad]
    downs, norms = watched(model)

    def run():
        kept = []
        hooks = [down.register_forward_pre_hook(lambda m, args: kept.append(storage_ref(args[0]))) for down in downs]
        hooks += [norm.register_forward_hook(lambda m, args, out: kept.append(storage_ref(out))) for norm in norms]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = batch_loss(model, batch, "causal-lm")[0]
        alive = held(kept)
        for hook in hooks:
            hook.remove()
        return loss, alive, torch.autograd.grad(loss, params)

    loss, alive, grads = run()
    with unittest.mock.patch("loratune.train.step.recomputing_saves", contextlib.nullcontext):
        loss_kept, alive_kept, grads_kept = run()
    if not autocast:  # (under autocast the LoRA layers save bf16 copies of their inputs instead)
        assert (alive, alive_kept) == (0, len(downs) + len(norms))
    assert torch.equal(loss, loss_kept)
    for mine, reference in zip(grads, grads_kept):
        assert torch.equal(mine, reference)


def test_the_remade_product_leaves_its_activation_for_the_mlps_backward():
    """Inside the training loss the down projection's LoRA remakes `act(gate) * up` just before the MLP's backward
    pass needs `act(gate)`: it is computed once there, not twice (forward and backward: two per layer)."""
    model = adapted()
    save_less(model)
    batch = {"input_ids": input_ids(batch=2, length=12)}
    batch["attention_mask"], batch["labels"] = torch.ones_like(batch["input_ids"]), batch["input_ids"]
    params = [p for p in model.parameters() if p.requires_grad]
    silu, calls = torch.nn.functional.silu, []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return silu(*args, **kwargs)

    def run():
        calls.clear()
        with unittest.mock.patch("torch.nn.functional.silu", counted):
            loss = batch_loss(model, batch, "causal-lm")[0]
            grads = torch.autograd.grad(loss, params)
        return len(calls), loss, grads

    count, loss, grads = run()
    with unittest.mock.patch("loratune.train.step.recomputing_saves", contextlib.nullcontext):
        count_kept, loss_kept, grads_kept = run()
    assert count == count_kept == 2 * LAYERS
    assert torch.equal(loss, loss_kept) and all(torch.equal(a, b) for a, b in zip(grads, grads_kept))
