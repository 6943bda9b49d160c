"""Both GGUF formats for every family GGUF export supports, read back with the `gguf` reader: architecture,
tensor names and shapes, the family's metadata keys, and f32 values equal to the merged weights with llama.cpp's
conventions (Llama's q/k row order, Gemma's norm + 1) written out here independently. Other architectures' refusal:
test_export_refusals.py."""

import gguf
import numpy as np
import pytest
import torch
from export_tools import bpe_tokenizer, save_adapter
from transformers import AutoModelForCausalLM

import loratune as lt
from benchmarks.tiny_families import gguf_family_configs
from loratune.export import export

LINEARS = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NORMS = ["attn_norm", "ffn_norm"]
GEMMA_NORMS = ["attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"]
CONFIGS = gguf_family_configs(hidden_size=32, max_positions=64, sliding_window=16, phi3_context=32,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0)

# family -> (config, GGUF architecture, per-block tensors besides the linears' weights, adapter targets,
#            expected family keys)
FAMILIES = {
    "llama": (CONFIGS["llama"], "llama", NORMS, LLAMA_TARGETS, {}),
    "mistral": (CONFIGS["mistral"], "llama", NORMS, LLAMA_TARGETS, {}),
    "qwen2": (CONFIGS["qwen2"], "qwen2", [*NORMS, "attn_q.bias", "attn_k.bias", "attn_v.bias"], LLAMA_TARGETS, {}),
    "qwen3": (CONFIGS["qwen3"], "qwen3", [*NORMS, "attn_q_norm", "attn_k_norm"], LLAMA_TARGETS,
              {"qwen3.attention.key_length": 16}),
    "gemma2": (CONFIGS["gemma2"], "gemma2", GEMMA_NORMS, LLAMA_TARGETS,
               {"gemma2.attn_logit_softcapping": 50.0, "gemma2.final_logit_softcapping": 30.0,
                "gemma2.attention.sliding_window": 16, "gemma2.attention.key_length": 16}),
    "gemma3": (CONFIGS["gemma3"], "gemma3", [*GEMMA_NORMS, "attn_q_norm", "attn_k_norm"], LLAMA_TARGETS,
               {"gemma3.attention.sliding_window": 16, "gemma3.attention.key_length": 16}),
    "phi3": (CONFIGS["phi3"], "phi3", NORMS, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
             {"phi3.rope.scaling.original_context_length": 32, "phi3.attention.sliding_window": 0}),
}
PHI3_LINEARS = ["attn_qkv", "attn_output", "ffn_up", "ffn_down"]


def read(path):
    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def values(tensor) -> np.ndarray:
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)


def rope_pairs(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's "llama" row order: each head's rows i and i + d/2 become neighbours."""
    d = rows.shape[0] // heads
    return rows[[h * d + half * d // 2 + i for h in range(heads) for i in range(d // 2) for half in (0, 1)]]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, model folder, adapter folder) for one tiny random model of the family."""
    name = request.param
    config = FAMILIES[name][0]
    tokenizer = bpe_tokenizer()
    config.vocab_size = len(tokenizer)
    config.architectures = [type(AutoModelForCausalLM.from_config(config)).__name__]
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(name)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    adapter = save_adapter(tmp_path_factory.mktemp(f"{name}-adapter"), folder, targets=FAMILIES[name][3])
    return name, folder, adapter


def expected_names(name: str) -> set[str]:
    _, _, extra, _, _ = FAMILIES[name]
    linears = PHI3_LINEARS if name == "phi3" else LINEARS
    per_block = [f"{t}.weight" for t in linears] + [t if t.endswith(".bias") else f"{t}.weight" for t in extra]
    names = {f"blk.{i}.{t}" for i in (0, 1) for t in per_block} | {"token_embd.weight", "output_norm.weight"}
    return names if name.startswith("gemma") else names | {"output.weight"}


def test_merged_gguf_layout_metadata_and_values(family, tmp_path):
    name, folder, adapter = family
    config, arch, _, _, keys = FAMILIES[name]
    export(adapter, str(folder), "gguf", tmp_path / "m.gguf", "f32")
    fields, tensors = read(tmp_path / "m.gguf")
    assert fields["general.architecture"] == arch and fields[f"{arch}.block_count"] == 2
    assert fields[f"{arch}.attention.head_count"] == 4 and fields[f"{arch}.attention.head_count_kv"] == 2
    assert {key: fields[key] for key in keys} == keys
    assert fields["tokenizer.chat_template"].startswith("{% for m in messages %}")
    assert set(tensors) == expected_names(name)
    model = AutoModelForCausalLM.from_pretrained(folder)
    lt.load_adapter(model, adapter)
    merged = lt.unload(model, merge=True).state_dict()
    checked = 0
    for hf_name, weight in merged.items():
        expected = weight.float().numpy()
        target = gguf_target(name, hf_name)
        if target is None:
            continue
        if name.startswith("gemma") and hf_name.endswith("norm.weight"):
            expected = expected + 1
        if arch == "llama" and target.endswith(("attn_q.weight", "attn_k.weight")):
            expected = rope_pairs(expected, 4 if "attn_q" in target else 2)
        np.testing.assert_array_equal(values(tensors[target]), expected, err_msg=f"{name} {target}")
        checked += 1
    assert checked == len(tensors)


HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "input_layernorm": "attn_norm",
              "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}


def gguf_target(family_name: str, hf_name: str) -> str | None:
    """The GGUF tensor a merged transformers tensor must land in, spelled out per family (None: not stored)."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return None if family_name.startswith("gemma") else "output.weight"
    parts = hf_name.split(".")
    if parts[:2] != ["model", "layers"]:
        return None
    block, module, suffix = parts[2], ".".join(parts[3:-1]), parts[-1]
    if module == "post_attention_layernorm":
        short = "post_attention_norm" if family_name.startswith("gemma") else "ffn_norm"
    else:
        short = HF_TO_GGUF[module]
    return f"blk.{block}.{short}.{suffix}"


def test_gguf_lora_names_shapes_and_alpha(family, tmp_path):
    name, folder, adapter = family
    _, arch, _, targets, _ = FAMILIES[name]
    export(adapter, str(folder), "gguf-lora", tmp_path / "lora.gguf")
    fields, tensors = read(tmp_path / "lora.gguf")
    assert fields["general.architecture"] == arch and fields["general.type"] == "adapter"
    assert fields["adapter.lora.alpha"] == 8.0
    linears = PHI3_LINEARS if name == "phi3" else LINEARS
    assert set(tensors) == {f"blk.{i}.{t}.weight.lora_{ab}" for i in (0, 1) for t in linears for ab in "ab"}
    model = AutoModelForCausalLM.from_pretrained(folder)
    for hf_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".layers." not in hf_name:
            continue
        target = gguf_target(name, hf_name + ".weight")
        if target is not None:
            out_features, in_features = module.weight.shape
            assert tuple(reversed(tensors[target + ".lora_a"].shape)) == (4, in_features), target
            assert tuple(reversed(tensors[target + ".lora_b"].shape)) == (out_features, 4), target
