"""torch.compile sees a LoRA forward as one graph (no graph breaks) and computes the same outputs."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from tiny_models import TokenNet, input_ids, max_diff, token_ids

from loratune import LoraConfig, add_adapter, mixed_adapter_batch, set_active_adapters


def _graph_breaks(fn, *args) -> int:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_count >= 1
    return explanation.graph_break_count


@pytest.mark.parametrize("variant", [{}, {"use_dora": True}, {"use_rslora": True}])
def test_token_net_forward_has_no_graph_breaks(variant):
    model = TokenNet()
    targets = ["proj", "mix", "head"] if variant.get("use_dora") else ["emb", "proj", "mix", "head"]
    add_adapter(model, LoraConfig(r=2, target_modules=targets, init_lora_weights=False, **variant))
    ids = token_ids()
    assert _graph_breaks(model, ids) == 0


def test_two_active_adapters_and_mixed_batch_have_no_graph_breaks():
    model = TokenNet()
    ids = token_ids(batch=3)
    add_adapter(model, LoraConfig(r=2, target_modules=["emb", "proj", "mix"], init_lora_weights=False), name="a")
    add_adapter(model, LoraConfig(r=3, target_modules=["proj", "head"], init_lora_weights=False), name="b")
    set_active_adapters(model, ["a", "b"])
    assert _graph_breaks(model, ids) == 0
    with mixed_adapter_batch(model, ["a", None, "b"]):
        assert _graph_breaks(model, ids) == 0


def test_llama_lora_forward_has_no_graph_breaks():
    model = tm.llama()
    add_adapter(model, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    ids = input_ids()

    def forward(ids):
        return model(input_ids=ids, use_cache=False).logits

    assert _graph_breaks(forward, ids) == 0


def test_compiled_fullgraph_matches_eager_and_trains():
    model = TokenNet()
    add_adapter(model, LoraConfig(r=2, target_modules=["emb", "proj", "mix"], init_lora_weights=False))
    ids = token_ids()
    eager = model(ids)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(ids)
    assert max_diff(out, eager) <= 1e-6
    out.square().sum().backward()
    grad = model.proj.lora_B["default"].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.proj.base_layer.weight.grad is None
