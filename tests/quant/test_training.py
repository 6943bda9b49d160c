"""Training over a quantized base (QLoRA) end to end on tiny GPT-2: learning, the adapter, defaults, resume."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loratune import ConfigError
from loratune.io import read_adapter_weights
from loratune.quant import QuantLinear
from loratune.train import fit
from loratune.train.config import validate_config
from loratune.train.loop import evaluate_run, prepare
from loratune.train.step import causal_lm_loss, chunked_head_loss


def run(data, resume=False):
    return fit(validate_config(data, "test"), resume=resume, quiet=True)


def train_losses(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


@pytest.mark.parametrize("format", ["nf4", "int8"])
def test_a_quantized_run_learns_and_its_adapter_fits_the_dense_base(format, run_config, tmp_path):
    data = run_config(model={"quantize": format}, train={"max_steps": 12, "learning_rate": 0.03})
    summary = run(data)
    assert summary["after"]["loss"] < summary["before"]["loss"] - 0.3
    losses = train_losses(tmp_path / "run")
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])

    adapter = tmp_path / "run" / "adapter"
    weights = read_adapter_weights(adapter)
    assert weights and all("lora_" in key for key in weights)
    assert any(key.endswith("lora_B.weight") and tensor.abs().max() > 0 for key, tensor in weights.items())
    # the saved adapter over the same quantized base reproduces the run's final evaluation
    again = evaluate_run(validate_config(data, "test"), quiet=True)
    assert again["loss"] == pytest.approx(summary["after"]["loss"], abs=1e-5)
    # and it loads onto the full-precision base, where it helps about as much
    dense = evaluate_run(validate_config(run_config(), "test"), adapter=adapter, quiet=True)
    assert dense["loss"] == pytest.approx(summary["after"]["loss"], abs=0.1)
    assert dense["loss"] < summary["before"]["loss"] - 0.3


def test_quantized_runs_checkpoint_activations_by_default_and_every_run_chunks_the_loss(run_config):
    quantized = prepare(validate_config(run_config(model={"quantize": "nf4"}), "test"), quiet=True)
    assert quantized.model.is_gradient_checkpointing and quantized.loss_chunk == 1024
    base = quantized.model.transformer.h[0].attn.c_attn.base_layer
    assert isinstance(base, QuantLinear) and base.format == "nf4" and base.double_quant
    assert type(quantized.model.lm_head) is nn.Linear

    dense = prepare(validate_config(run_config(), "test"), quiet=True)
    assert not dense.model.is_gradient_checkpointing and dense.loss_chunk == 1024

    chosen = prepare(validate_config(run_config(model={"quantize": "int8", "double_quant": False},
                                                train={"gradient_checkpointing": False, "loss_chunk_tokens": 7}),
                                     "test"), quiet=True)
    assert not chosen.model.is_gradient_checkpointing and chosen.loss_chunk == 7
    assert chosen.model.transformer.h[0].mlp.c_fc.base_layer.format == "int8"
    forced = prepare(validate_config(run_config(train={"gradient_checkpointing": True}), "test"), quiet=True)
    assert forced.model.is_gradient_checkpointing and forced.loss_chunk == 1024


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trained-head", "frozen-head"])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_head_loss_equals_the_whole_cross_entropy(chunk, frozen, bias):
    generator = torch.Generator().manual_seed(0)
    head = nn.Linear(16, 50, bias=bias).requires_grad_(not frozen)
    hidden = torch.randn(7, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (7,), generator=generator)
    wrt = [hidden] if frozen else [hidden, head.weight]
    expected = F.cross_entropy(head(hidden), targets, reduction="sum")
    expected_grads = torch.autograd.grad(expected * 0.5, wrt)

    loss = chunked_head_loss(head, hidden, targets, chunk)
    assert loss.dtype == torch.float32
    assert (type(loss.grad_fn).__name__ == "_FrozenHeadLossBackward") == frozen  # a frozen head skips recompute
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(loss * 0.5, wrt), expected_grads):  # 0.5: backward scales
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(chunked_head_loss(head, hidden, targets, chunk), expected, rtol=1e-5, atol=1e-5)


def test_frozen_head_loss_under_bf16_autocast_is_close_to_fp32():
    generator = torch.Generator().manual_seed(0)
    head = nn.Linear(16, 50).requires_grad_(False)
    hidden = torch.randn(9, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (9,), generator=generator)
    expected = F.cross_entropy(head(hidden), targets, reduction="sum")
    (expected_grad,) = torch.autograd.grad(expected, [hidden])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_head_loss(head, hidden, targets, 4)
    (grad,) = torch.autograd.grad(loss, [hidden])
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad, expected_grad, rtol=3e-2, atol=3e-2)


def test_a_chunked_loss_over_no_labelled_tokens_still_backpropagates():
    head = nn.Linear(16, 50)
    hidden = torch.randn(0, 16, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.long)
    F.cross_entropy(head(hidden), targets, reduction="sum").backward()  # the unchunked loss can
    chunked_head_loss(head, hidden, targets, 3).backward()
    assert head.weight.grad.abs().max() == 0


def test_the_chunked_loss_of_a_quantized_model_matches_the_plain_one(run_config):
    session = prepare(validate_config(run_config(model={"quantize": "nf4"}), "test"), quiet=True)
    model = session.model
    model.train()
    ids = torch.randint(6, 40, (3, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100  # answer-only loss: the head runs on the labelled positions alone
    labels[2, -1] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    params = [p for p in model.parameters() if p.requires_grad]

    torch.manual_seed(1)  # the same dropout masks in both passes (the body runs before the head)
    plain, logits, weight = causal_lm_loss(model, batch, loss_chunk=0)
    assert logits.shape[0] == weight == 14
    plain_grads = torch.autograd.grad(plain, params)
    torch.manual_seed(1)
    chunked, no_logits, chunked_weight = causal_lm_loss(model, batch, loss_chunk=3)
    assert no_logits is None and chunked_weight == 14
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    for got, expected in zip(torch.autograd.grad(chunked, params), plain_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert any(g.abs().max() > 0 for g in plain_grads)


def test_parameter_counts_do_not_depend_on_the_storage_format(run_config):
    from loratune import trainable_parameters

    dense = trainable_parameters(prepare(validate_config(run_config(), "test"), quiet=True).model)
    quantized = trainable_parameters(
        prepare(validate_config(run_config(model={"quantize": "nf4"}), "test"), quiet=True).model)
    assert quantized.trainable == dense.trainable > 0
    assert quantized.total == dense.total


def test_loftq_without_quantize_is_a_config_error_naming_the_key(run_config):
    with pytest.raises(ConfigError, match=r"run\.yaml: model: loftq_iterations needs model\.quantize"):
        validate_config(run_config(model={"loftq_iterations": 2}), "run.yaml")
    with pytest.raises(ConfigError, match=r"run\.yaml: model\.quantize: "):
        validate_config(run_config(model={"quantize": "nf5"}), "run.yaml")
    config = validate_config(run_config(model={"quantize": "nf4", "loftq_iterations": 2}), "run.yaml")
    assert config.model.loftq_iterations == 2 and config.model.double_quant


def test_a_loftq_run_trains_and_its_adapter_reloads_over_the_same_base(run_config, tmp_path):
    data = run_config(model={"quantize": "nf4", "loftq_iterations": 1}, train={"max_steps": 6})
    summary = run(data)
    assert summary["after"]["loss"] < summary["before"]["loss"]
    # evaluation rebuilds the LoftQ base from the seeded initial adapter, then loads the trained weights
    again = evaluate_run(validate_config(data, "test"), quiet=True)
    assert again["loss"] == pytest.approx(summary["after"]["loss"], abs=1e-5)


def test_loftq_and_pissa_together_are_a_config_error(run_config):
    data = run_config(model={"quantize": "nf4", "loftq_iterations": 1})
    data["lora"]["init_lora_weights"] = "pissa"
    with pytest.raises(ConfigError, match="loftq_iterations and lora.init_lora_weights: pissa"):
        validate_config(data, "run.yaml")
