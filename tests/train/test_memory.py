"""The memory estimate: exact parameter counts, the effect of each setting, the CLI and the warning."""

import dataclasses

import pytest
import yaml

from loratune.cli import main
from loratune.core.adapters import add_adapter, trainable_parameters
from loratune.pretrained import load_model
from loratune.quant.storage import bytes_per_weight
from loratune.tasks import TASK_TYPES
from loratune.train.memory import GB, estimate_memory, machine_memory, memory_warning
from loratune.train.run_config import validate_config


def estimate(run_config, **model):
    return estimate_memory(validate_config(run_config(model=model, train={"precision": "fp32"}), "test"))


def linear_weights(model) -> int:
    """Weights of GPT-2's Conv1D layers in the blocks: what quantize converts."""
    return sum(m.weight.numel() for n, m in model.named_modules() if n.endswith(("c_attn", "c_proj", "c_fc")))


def test_counts_match_the_real_model(run_config, tiny_gpt2):
    config = validate_config(run_config(train={"precision": "fp32"}), "test")
    model, _ = load_model(tiny_gpt2, "causal-lm")
    total = sum(p.numel() for p in model.parameters())
    add_adapter(model, dataclasses.replace(config.lora, task_type=TASK_TYPES["causal-lm"]))
    found = estimate_memory(config)
    assert found.trainable == trainable_parameters(model).trainable > 0
    assert found.adapter == 16 * found.trainable
    assert found.weights == total * 4  # fp32 base, nothing quantized


def test_quantizing_shrinks_exactly_the_linear_weights(run_config, tiny_gpt2):
    model, _ = load_model(tiny_gpt2, "causal-lm")
    linear = linear_weights(model)
    dense, nf4, int8 = (estimate(run_config, name=tiny_gpt2, quantize=q) for q in ("none", "nf4", "int8"))
    assert dense.weights - nf4.weights == pytest.approx(linear * (4 - bytes_per_weight("nf4")), abs=1)
    assert dense.weights - int8.weights == pytest.approx(linear * 3, abs=1)
    # quantized runs stream the weights in; checkpointing is not on by default for them (it follows the memory);
    # their layers run the LoRA branch as a node of its own, whose backward pass keeps more buffers
    from loratune.train import memory

    tokens, inner = 4 * 32, 4 * model.config.n_embd  # run_config's batch; GPT-2's MLP width
    more = (memory.BACKWARD_BUFFERS["fp32"] - memory.ONE_NODE_BACKWARD_BUFFERS) * 4 * inner * tokens
    assert nf4.loading < dense.loading and nf4.activations - dense.activations == pytest.approx(more, abs=8)


def test_longer_batches_need_more_memory(run_config, tiny_gpt2):
    short = estimate_memory(validate_config(run_config(data={"max_length": 16}), "test"))
    long = estimate_memory(validate_config(run_config(data={"max_length": 64}), "test"))
    assert long.activations == pytest.approx(4 * short.activations, abs=8)  # each rounded to whole bytes
    assert long.logits == pytest.approx(4 * short.logits)


def test_the_resident_share_of_saved_activations_follows_the_processs_malloc(run_config, tiny_gpt2, monkeypatch):
    from loratune.train import memory

    factors = dict(memory.RESIDENT_PER_SAVED)
    assert factors["jemalloc"] < factors["system"]
    found = {}
    for malloc in ("system", "jemalloc", "libtcmalloc.so.4"):
        monkeypatch.setattr(memory, "active_malloc", lambda malloc=malloc: malloc)
        found[malloc] = estimate(run_config, name=tiny_gpt2)
    assert found["libtcmalloc.so.4"] == found["system"]  # a library not fitted counts as glibc, the larger
    assert found["jemalloc"].weights == found["system"].weights
    monkeypatch.setitem(memory.RESIDENT_PER_SAVED, "system", 0.0)  # what remains: the backward buffers
    backward = estimate(run_config, name=tiny_gpt2).activations
    saved = (found["system"].activations - backward) / factors["system"]
    assert saved > 0
    assert found["jemalloc"].activations - backward == pytest.approx(saved * factors["jemalloc"], rel=1e-6)


def test_warning_only_when_the_peak_exceeds_the_machine(run_config, tiny_gpt2):
    found = estimate(run_config, name=tiny_gpt2)
    assert memory_warning(found, None) is None
    assert memory_warning(found, found.peak) is None
    message = memory_warning(found, found.peak - 1)
    assert "exceeds" in message and "quantize" in message and "\n" not in message
    assert machine_memory() > 1 * GB


def test_inspect_memory_prints_the_estimate_without_loading_weights(run_config, tmp_path, capsys, monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("inspect --memory must not load weights")

    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", refuse)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config(model={"quantize": "nf4"})))
    assert main(["inspect", "--config", str(path), "--memory"]) == 0
    out = capsys.readouterr().out
    assert "quantize nf4" in out and "peak while training" in out and "trainable parameters" in out


def test_inspect_memory_needs_a_config(capsys):
    assert main(["inspect", "--memory", "--model", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "loratune: error: inspect --memory: give --config, the run to estimate"


def test_train_refuses_a_quantization_the_layers_cannot_take(run_config, tmp_path, tiny_gpt2, capsys):
    """36 x 108 = 3,888 weights per c_attn: not a whole number of 64-weight NF4 blocks."""
    import shutil
    from pathlib import Path

    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "odd-gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=36, n_layer=1, n_head=2)).save_pretrained(folder)
    for name in Path(tiny_gpt2).iterdir():
        if name.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(name, folder / name.name)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config(model={"name": str(folder), "quantize": "nf4"})))
    capsys.readouterr()  # what writing the odd model printed (a progress bar, unless an earlier test hid them)
    assert main(["train", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nf4 needs a weight size divisible by 64" in err and "c_attn" in err, err
    assert not (tmp_path / "run").exists()


def test_only_a_local_safetensors_model_is_estimated_as_streamed(run_config, tmp_path, tiny_gpt2):
    """Without safetensors files the quantized load goes through from_pretrained, whole, then quantizes."""
    import shutil
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "bin-gpt2"
    pickled.mkdir()
    for name in Path(tiny_gpt2).iterdir():
        if name.suffix == ".safetensors":
            torch.save(load_file(name), pickled / "pytorch_model.bin")
        else:
            shutil.copy(name, pickled / name.name)
    streamed = estimate(run_config, name=tiny_gpt2, quantize="nf4")
    whole = estimate(run_config, name=str(pickled), quantize="nf4")
    assert streamed.weights == whole.weights and whole.loading > streamed.loading
