"""Training over a quantized base (QLoRA) end to end on tiny GPT-2: learning, the adapter, defaults, resume."""

import json

import pytest
import torch
from torch import nn

from loratune import ConfigError
from loratune.core.peft_format import read_adapter_weights
from loratune.quant import QuantLinear
from loratune.train import fit
from loratune.train.loop import evaluate_run
from loratune.train.memory import BACKWARD_BUFFERS, estimate_memory
from loratune.train.run_config import validate_config
from loratune.train.session import prepare
from loratune.train.step import causal_lm_loss


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


def test_checkpointing_only_where_the_estimate_without_it_exceeds_memory_and_every_run_chunks_the_loss(
        run_config, monkeypatch):
    # the same backward buffers for plain and quantized layers (a tiny model's buffers would outweigh its weights)
    monkeypatch.setattr("loratune.train.memory.ONE_NODE_BACKWARD_BUFFERS", BACKWARD_BUFFERS["fp32"])
    config = validate_config(run_config(model={"quantize": "nf4"}), "test")
    need = estimate_memory(config, checkpointing=False).training
    monkeypatch.setattr("loratune.train.session.machine_memory", lambda: need + 1)
    fits = prepare(config, quiet=True)
    assert not fits.model.is_gradient_checkpointing and not fits.checkpointing and fits.loss_chunk == 1024
    assert fits.checkpointing_note.startswith("off (estimated peak without it")
    base = fits.model.transformer.h[0].attn.c_attn.base_layer
    assert isinstance(base, QuantLinear) and base.format == "nf4" and base.double_quant
    assert type(fits.model.lm_head) is nn.Linear

    monkeypatch.setattr("loratune.train.session.machine_memory", lambda: need - 1)
    for quantize in ("nf4", "none"):  # per model and machine, quantized or not
        tight = prepare(validate_config(run_config(model={"quantize": quantize}), "test"), quiet=True)
        assert tight.model.is_gradient_checkpointing and tight.checkpointing
        note = tight.checkpointing_note
        assert note.startswith("on (estimated peak without it") and "exceeds" in note

    chosen = prepare(validate_config(run_config(model={"quantize": "int8", "double_quant": False},
                                                train={"gradient_checkpointing": False, "loss_chunk_tokens": 7}),
                                     "test"), quiet=True)  # an explicit setting wins over the estimate
    assert not chosen.model.is_gradient_checkpointing and chosen.loss_chunk == 7
    assert chosen.checkpointing_note == "off (train.gradient_checkpointing)"
    assert chosen.model.transformer.h[0].mlp.c_fc.base_layer.format == "int8"
    monkeypatch.setattr("loratune.train.session.machine_memory", lambda: need * 100)
    forced = prepare(validate_config(run_config(train={"gradient_checkpointing": True}), "test"), quiet=True)
    assert forced.model.is_gradient_checkpointing and forced.loss_chunk == 1024


def test_the_chunked_loss_of_a_quantized_model_matches_the_plain_one(run_config):
    session = prepare(validate_config(run_config(model={"quantize": "nf4"}), "test"), quiet=True)
    model = session.model
    model.train()
    ids = torch.randint(6, 40, (3, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100  # answer-only loss: the head runs on the labelled positions alone
    labels[2, -1] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    batch = {key: value.to(session.device) for key, value in batch.items()}  # where the model is (CUDA if any)
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
