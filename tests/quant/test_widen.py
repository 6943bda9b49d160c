"""A frozen base kept in 16 bits with fp32 products (`quant.widen`): the same numbers as an fp32 load."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from quant_tools import input_ids, llama
from torch import nn

from loratune import LoraConfig, add_adapter
from loratune.core.adapters import merge
from loratune.core.peft_format import save_adapter
from loratune.precision import base_dtype
from loratune.pretrained import load_adapted_model, load_model, stored_dtype
from loratune.quant.convert import quantizable_layers
from loratune.quant.widen import WidenedLinear, widen_frozen_base, widenable_layers
from loratune.train import fit
from loratune.train.memory import BACKWARD_BUFFERS, estimate_memory, frozen_dtype
from loratune.train.run_config import validate_config
from loratune.train.session import prepare


def narrow_and_wide(seed=0, **overrides):
    """A bf16 Llama, widened, and the fp32 model holding the very same (bf16-exact) values."""
    narrow = llama(seed, **overrides).to(torch.bfloat16)
    wide = copy.deepcopy(narrow).float()
    widen_frozen_base(narrow)
    return narrow, wide


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_widened_layer_is_the_fp32_layer_forward_and_backward(bias, dtype):
    torch.manual_seed(0)
    dense = nn.Linear(48, 32, bias=bias).to(dtype).requires_grad_(False)
    layer = WidenedLinear.from_linear(dense, torch.float32)
    assert layer.weight.dtype == dtype and layer.weight.data_ptr() == dense.weight.data_ptr()  # not copied
    x = torch.randn(3, 5, 48, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = layer(x)
    ref = F.linear(x_ref, dense.weight.float(), None if dense.bias is None else dense.bias.float())
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-7)
    assert layer.weight.grad is None


def test_autograd_keeps_no_widened_copy_of_the_weight():
    torch.manual_seed(0)
    layer = WidenedLinear.from_linear(nn.Linear(256, 512, bias=False).bfloat16(), torch.float32)
    saved = []
    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    assert saved and all(t.dtype == torch.bfloat16 for t in saved if t.shape == (512, 256))
    assert not any(t.dtype == torch.float32 and t.numel() >= 512 * 256 for t in saved)


def test_under_autocast_a_widened_layer_is_a_plain_bf16_layer():
    torch.manual_seed(0)
    dense = nn.Linear(64, 64).bfloat16()
    layer = WidenedLinear.from_linear(dense, torch.float32)
    x = torch.randn(2, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = layer(x), dense(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-2)  # the layers' biases differ in dtype (fp32 vs bf16)


@pytest.mark.parametrize("tied", [False, True])
def test_a_widened_model_with_an_adapter_has_the_fp32_models_loss_and_gradients(tied):
    narrow, wide = narrow_and_wide(tie_word_embeddings=tied)
    linears = [m for m in narrow.modules() if isinstance(m, WidenedLinear)]
    assert len(linears) == 2 * 7 and all(m.weight.dtype == torch.bfloat16 for m in linears)
    others = [p for n, p in narrow.named_parameters() if not any(p is m.weight for m in linears)]
    assert others and all(p.dtype == torch.float32 for p in others)  # embeddings, norms, head
    assert (narrow.lm_head.weight is narrow.model.embed_tokens.weight) is tied
    lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(1)
    add_adapter(narrow, lora)
    torch.manual_seed(1)
    add_adapter(wide, lora)
    ids = input_ids()
    a, b = narrow(input_ids=ids, labels=ids), wide(input_ids=ids, labels=ids)
    assert torch.equal(a.logits, b.logits)
    a.loss.backward()
    b.loss.backward()
    grads = [(p.grad, q.grad) for p, q in zip(narrow.parameters(), wide.parameters()) if p.requires_grad]
    assert len(grads) == 2 * 2 * 7
    for got, want in grads:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_merging_into_a_widened_base_keeps_its_16_bits_and_its_outputs():
    narrow, _ = narrow_and_wide()
    add_adapter(narrow, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = input_ids()
    with torch.no_grad():
        before = narrow(input_ids=ids).logits
        merge(narrow)
        merged = narrow(input_ids=ids).logits
    assert all(m.weight.dtype == torch.bfloat16 for m in narrow.modules() if isinstance(m, WidenedLinear))
    assert ((merged - before).norm() / before.norm()).item() < 1e-2  # the merged weights rounded to bf16


def test_only_the_frozen_body_layers_widen():
    narrow, _ = narrow_and_wide()
    widened = {p for p, m in narrow.named_modules() if isinstance(m, WidenedLinear)}
    assert widened == set(quantizable_layers(narrow)) and "lm_head" not in widened
    assert widen_frozen_base(narrow) == 0  # already widened: nothing left to do


def test_the_saved_dtype_is_read_from_the_weight_files(tiny_llama, tiny_llama_bf16, tmp_path):
    assert stored_dtype(tiny_llama_bf16) == torch.bfloat16
    assert stored_dtype(tiny_llama) == torch.float32
    assert stored_dtype(str(tmp_path / "missing")) is None


def test_auto_keeps_a_16_bit_checkpoint_in_16_bits_only_where_products_run_in_fp32():
    assert base_dtype("auto", "fp32", torch.bfloat16) == torch.bfloat16
    assert base_dtype("auto", "fp32", torch.float16) == torch.float16
    assert base_dtype("auto", "fp32", torch.float32) == torch.float32
    assert base_dtype("auto", "fp32", None) == torch.float32
    assert base_dtype("auto", "bf16", torch.float32) == torch.bfloat16
    assert base_dtype("float32", "fp32", torch.bfloat16) == torch.float32


def test_load_model_widens_a_16_bit_load_for_fp32_products(tiny_llama_bf16):
    model, _ = load_model(tiny_llama_bf16, "causal-lm", dtype=torch.bfloat16, compute_dtype=torch.float32)
    assert sum(isinstance(m, WidenedLinear) for m in model.modules()) == 2 * 7
    assert model.lm_head.weight.dtype == torch.float32 and model.dtype == torch.float32
    plain, _ = load_model(tiny_llama_bf16, "causal-lm", dtype=torch.bfloat16)  # products in bf16: as before
    assert not any(isinstance(m, WidenedLinear) for m in plain.modules())


def losses(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def squeezed(monkeypatch, config):
    """This machine's memory as the run would see it: between the run's estimate with a 16-bit base and with
    an fp32 one (both without checkpointing)."""
    import loratune.train.session as session_module

    bf16, fp32 = (estimate_memory(config, False, storage=d).training for d in (torch.bfloat16, torch.float32))
    assert bf16 < fp32
    monkeypatch.setattr(session_module, "machine_memory", lambda: (bf16 + fp32) // 2)
    return (bf16 + fp32) // 2


def test_auto_keeps_a_bf16_checkpoint_in_fp32_where_it_fits_else_in_16_bits_with_the_same_training(
        run_config, tiny_llama_bf16, tmp_path, monkeypatch):
    def config(dtype, out):
        return validate_config(run_config(model={"name": tiny_llama_bf16, "dtype": dtype},
                                          lora={"target_modules": "all-linear", "lora_dropout": 0.0},
                                          output_dir=str(tmp_path / out)), "test")

    # the same backward buffers for widened and plain layers (a tiny model's buffers would outweigh its weights)
    monkeypatch.setattr("loratune.train.memory.ONE_NODE_BACKWARD_BUFFERS", BACKWARD_BUFFERS["fp32"])
    auto, float32, bfloat16 = config("auto", "auto"), config("float32", "float32"), config("bfloat16", "bf16")
    roomy = prepare(auto, quiet=True)  # this machine holds the fp32 weights: no widening
    assert not any(isinstance(m, WidenedLinear) for m in roomy.model.modules())
    assert frozen_dtype(auto, None) == torch.float32 and frozen_dtype(bfloat16, 10**15) == torch.bfloat16
    available = squeezed(monkeypatch, auto)
    assert frozen_dtype(auto, available) == torch.bfloat16
    session = prepare(auto, quiet=True)
    widened = [m for m in session.model.modules() if isinstance(m, WidenedLinear)]
    assert len(widened) == 2 * 7 and session.precision == "fp32" and not session.checkpointing
    summary = fit(auto, quiet=True)
    assert summary["widened_from"] == "bfloat16"
    assert "kept in bfloat16, widened" in (tmp_path / "auto" / "report.md").read_text()
    assert fit(float32, quiet=True)["widened_from"] is None
    got, want = losses(tmp_path / "auto"), losses(tmp_path / "float32")
    assert len(got) == 6 and got == pytest.approx(want, rel=1e-5)  # the same products, bit for bit or nearly
    # the estimate counts the body's linear weights at 2 bytes instead of 4
    linear = sum(m.weight.numel() for m in widened)
    assert estimate_memory(float32).weights - estimate_memory(auto, storage=torch.bfloat16).weights == 2 * linear


def test_a_widened_layer_given_its_own_16_bit_input_runs_in_16_bits_with_its_bias():
    layer = WidenedLinear.from_linear(nn.Linear(16, 8).bfloat16(), torch.float32)
    out = layer(torch.randn(2, 16).bfloat16())  # e.g. model code that casts to the weight's dtype first
    assert out.dtype == torch.bfloat16 and out.shape == (2, 8)


def test_a_modules_to_save_copy_of_a_widened_layer_trains_in_fp32_and_reloads_exactly(tiny_llama_bf16, tmp_path):
    lora = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["model.layers.0.mlp.down_proj"])
    model, _ = load_adapted_model(tiny_llama_bf16, "causal-lm", lora, "default", dtype=torch.bfloat16,
                                  compute_dtype=torch.float32)
    saved = model.model.layers[0].mlp.down_proj
    copy_ = saved.modules_to_save["default"]
    assert type(copy_) is nn.Linear and copy_.weight.dtype == torch.float32 and copy_.weight.requires_grad
    assert isinstance(saved.original_module, WidenedLinear)  # the frozen original stays 16-bit
    ids = input_ids(vocab=20)
    model(input_ids=ids, labels=ids).loss.backward()
    assert copy_.weight.grad is not None and copy_.weight.grad.abs().sum() > 0
    with torch.no_grad():
        copy_.weight.add_(torch.randn_like(copy_.weight) * 1e-3)  # values no bf16 holds
    save_adapter(model, tmp_path / "adapter")
    again, _ = load_adapted_model(tiny_llama_bf16, "causal-lm", lora, "default", adapter_dir=tmp_path / "adapter",
                                  dtype=torch.bfloat16, compute_dtype=torch.float32)
    loaded = again.model.layers[0].mlp.down_proj.modules_to_save["default"]
    assert loaded.weight.dtype == torch.float32 and torch.equal(loaded.weight, copy_.weight)


def test_layers_a_model_keeps_in_fp32_are_not_widened(tiny_t5):
    model, _ = load_model(tiny_t5, "seq2seq", dtype=torch.bfloat16, compute_dtype=torch.float32)
    widened = {p for p, m in model.named_modules() if isinstance(m, WidenedLinear)}
    assert widened and widened == set(widenable_layers(model))
    assert not any(p.endswith(".wo") for p in widened)
    assert all(m.weight.dtype == torch.float32 for p, m in model.named_modules() if p.endswith(".wo"))


def test_unknown_machine_memory_or_dora_keeps_fp32_weights(run_config, tiny_llama_bf16):
    lora = {"target_modules": "all-linear"}
    auto = validate_config(run_config(model={"name": tiny_llama_bf16}, lora=lora), "test")
    dora = validate_config(run_config(model={"name": tiny_llama_bf16}, lora={**lora, "use_dora": True}), "test")
    assert frozen_dtype(auto, None) == torch.float32 and frozen_dtype(dora, 1) == torch.float32
    assert frozen_dtype(auto, 1) == torch.bfloat16  # one byte of memory: nothing fits in fp32


def test_gpt2s_conv1d_layers_stay_in_the_compute_dtype_and_the_estimate_says_so(run_config, tiny_gpt2):
    model, _ = load_model(tiny_gpt2, "causal-lm", dtype=torch.bfloat16, compute_dtype=torch.float32)
    assert not widenable_layers(model) and {p.dtype for p in model.parameters()} == {torch.float32}
    config = validate_config(run_config(model={"dtype": "bfloat16"}), "test")
    assert estimate_memory(config, False, torch.bfloat16).weights == \
        estimate_memory(config, False, torch.float32).weights


def test_the_saved_dtype_is_the_one_holding_most_elements(tmp_path, tiny_llama_bf16):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "mixed"
    shutil.copytree(tiny_llama_bf16, folder)
    tensors = load_file(folder / "model.safetensors")
    norms = {k: v.float() if "norm" in k else v for k, v in tensors.items()}  # fp32 norms beside bf16 matrices
    save_file(norms, folder / "model.safetensors", metadata={"format": "pt"})
    assert stored_dtype(str(folder)) == torch.bfloat16
    (folder / "model.safetensors.index.json").write_text("{not json")
    assert stored_dtype(str(folder)) is None


def test_full_fine_tuning_and_the_probe_always_load_float32(run_config, tiny_llama_bf16):
    config = validate_config(run_config(model={"name": tiny_llama_bf16}, method="full"), "test")
    assert frozen_dtype(config, 1) == torch.float32
