"""GGUF writers, read back with the `gguf` package's reader: names, shapes, metadata, alpha, types, values."""

import gguf
import numpy as np
import pytest
import torch
from export_tools import CHATML, TARGETS, bpe_tokenizer, save_adapter, tiny_adapter, tiny_llama_dir  # noqa: F401 (fixtures)
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from loratune.export import export, gguf_source
from loratune.export.gguf_model import add_tokenizer
from loratune.export.layout import layout_for
from loratune.export.modelfile import modelfile_text

GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
ATTN = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
HEADS = {"attn_q": 4, "attn_k": 2}


def read(path):
    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def values(tensor) -> np.ndarray:
    """The tensor as float32 in numpy (row-major, PEFT's orientation), whatever its GGUF type."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)


def rope_pairs(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order, written out: each head's rows i and i + d/2 become neighbours."""
    d = rows.shape[0] // heads
    order = [h * d + half * d // 2 + i for h in range(heads) for i in range(d // 2) for half in (0, 1)]
    return rows[order]


def hf_path(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{ATTN.get(module, 'mlp')}.{module}"


def test_gguf_lora_layout_metadata_and_values(tiny_llama_dir, tiny_adapter, tmp_path):
    out = tmp_path / "lora.gguf"
    export(tiny_adapter, str(tiny_llama_dir), "gguf-lora", out)
    fields, tensors = read(out)
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 8.0
    expected = {f"blk.{i}.{GGUF_NAMES[m]}.weight.lora_{ab}" for i in (0, 1) for m in TARGETS for ab in "ab"}
    assert set(tensors) == expected
    peft = load_file(f"{tiny_adapter}/adapter_model.safetensors")
    for layer in (0, 1):
        for module in TARGETS:
            name = f"blk.{layer}.{GGUF_NAMES[module]}.weight"
            a = peft[f"base_model.model.{hf_path(layer, module)}.lora_A.weight"].numpy()
            b = peft[f"base_model.model.{hf_path(layer, module)}.lora_B.weight"].numpy()
            assert tensors[name + ".lora_a"].tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(values(tensors[name + ".lora_a"]), a)  # (r, in), not transposed
            heads = HEADS.get(GGUF_NAMES[module])
            np.testing.assert_array_equal(values(tensors[name + ".lora_b"]), rope_pairs(b, heads) if heads else b)


@pytest.mark.parametrize("lora", [{}, {"use_rslora": True}, {"alpha_pattern": {"v_proj": 2.0}, "r": 8}])
def test_merged_gguf_equals_base_plus_llama_cpp_lora_formula(tiny_llama_dir, tmp_path, lora):
    """llama.cpp computes W + alpha / r * lora_b @ lora_a; the merged file must hold exactly that."""
    adapter = save_adapter(tmp_path / "adapter", tiny_llama_dir, **lora)
    export(adapter, str(tiny_llama_dir), "gguf-lora", tmp_path / "lora.gguf")
    export(adapter, str(tiny_llama_dir), "gguf", tmp_path / "merged.gguf", "f32")
    lora_fields, lora_tensors = read(tmp_path / "lora.gguf")
    _, merged = read(tmp_path / "merged.gguf")
    base = load_file(f"{tiny_llama_dir}/model.safetensors")
    alpha = lora_fields["adapter.lora.alpha"]
    for layer in (0, 1):
        for module in TARGETS:
            name = f"blk.{layer}.{GGUF_NAMES[module]}.weight"
            a, b = values(lora_tensors[name + ".lora_a"]), values(lora_tensors[name + ".lora_b"])
            weight = base[hf_path(layer, module) + ".weight"].numpy()
            heads = HEADS.get(GGUF_NAMES[module])
            weight = rope_pairs(weight, heads) if heads else weight
            np.testing.assert_allclose(values(merged[name]), weight + alpha / a.shape[0] * b @ a, atol=2e-6)


def test_merged_gguf_metadata_tokenizer_and_types(tiny_llama_dir, tiny_adapter, tmp_path):
    export(tiny_adapter, str(tiny_llama_dir), "gguf", tmp_path / "q8.gguf", "q8_0")
    export(tiny_adapter, str(tiny_llama_dir), "gguf", tmp_path / "f32.gguf", "f32")
    fields, tensors = read(tmp_path / "q8.gguf")
    _, exact = read(tmp_path / "f32.gguf")
    assert fields["general.type"] == "model" and fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (fields["llama.block_count"], fields["llama.embedding_length"], fields["llama.attention.head_count"],
            fields["llama.attention.head_count_kv"], fields["llama.vocab_size"]) == (2, 32, 4, 2, 300)
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == 300
    assert fields["tokenizer.ggml.tokens"][1] == "<|im_start|>" and fields["tokenizer.ggml.eos_token_id"] == 2
    assert fields["tokenizer.ggml.token_type"][1] == gguf.TokenType.CONTROL
    assert "<|im_start|>" in fields["tokenizer.chat_template"]
    assert len(tensors) == 2 * 9 + 3  # 7 linears + 2 norms per block, embeddings, final norm, output head
    for name, tensor in tensors.items():
        reference = values(exact[name])
        if name.endswith("norm.weight"):
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, name
            np.testing.assert_array_equal(values(tensor), reference)
        else:  # embeddings and output head too, as llama.cpp's converter writes them (docs/export.md)
            assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0, name
            step = np.abs(reference).reshape(-1, 32).max(axis=1).repeat(32).reshape(reference.shape) / 127
            # half a quantization step, plus the f16 rounding of the block scale (127 * 2**-11 steps)
            assert np.all(np.abs(values(tensor) - reference) <= step * (0.5 + 127 * 2**-11) + 1e-7), name


def test_q8_0_export_of_a_tied_model_writes_one_q8_0_embedding_and_f32_norms(tmp_path):
    """A tied model (SmolLM2) has no output.weight: llama.cpp reads token_embd as the head too."""
    tokenizer = bpe_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    tokenizer.save_pretrained(tmp_path / "tied")
    adapter = save_adapter(tmp_path / "adapter", tmp_path / "tied")
    export(adapter, str(tmp_path / "tied"), "gguf", tmp_path / "q8.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "q8.gguf").tensors}
    assert "output.weight" not in types and types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert {types[name] for name in types if name.endswith("norm.weight")} == {gguf.GGMLQuantizationType.F32}
    assert {types[name] for name in types if not name.endswith("norm.weight")} == {gguf.GGMLQuantizationType.Q8_0}


def test_lora_dtypes_and_q8_fallback(tiny_llama_dir, tiny_adapter, tmp_path):
    export(tiny_adapter, str(tiny_llama_dir), "gguf-lora", tmp_path / "f16.gguf", "f16")
    export(tiny_adapter, str(tiny_llama_dir), "gguf-lora", tmp_path / "q8.gguf", "q8_0")
    _, f16 = read(tmp_path / "f16.gguf")
    _, q8 = read(tmp_path / "q8.gguf")
    assert {t.tensor_type for t in f16.values()} == {gguf.GGMLQuantizationType.F16}
    # lora_a rows (32 or 64 inputs) fill q8_0 blocks; lora_b rows (rank 4) do not, and fall back to f16
    assert q8["blk.0.attn_q.weight.lora_a"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert q8["blk.0.attn_q.weight.lora_b"].tensor_type == gguf.GGMLQuantizationType.F16
    np.testing.assert_allclose(values(q8["blk.0.ffn_down.weight.lora_a"]),
                               values(f16["blk.0.ffn_down.weight.lora_a"]), atol=0.01)


@pytest.fixture(scope="module")
def shipped_smollm2():
    """The built-in GGUF file, read once (parsing its 98k vocabulary and merge strings takes seconds)."""
    return read(gguf_source("smollm2-135m-instruct"))


def test_rope_reordering_matches_the_shipped_smollm2_gguf(smollm2, shipped_smollm2):
    """The built-in GGUF was written by llama.cpp's converter; transformers undid its q/k reordering on load."""
    model, _ = smollm2
    layout = layout_for(model.config)
    _, shipped = shipped_smollm2
    for hf, name in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
        ours = layout.reorder_rows(f"blk.3.{name}.weight",
                                   model.get_parameter(f"model.layers.3.self_attn.{hf}.weight").detach().numpy())
        np.testing.assert_array_equal(ours, values(shipped[f"blk.3.{name}.weight"]), err_msg=name)


def test_tokenizer_keys_copied_from_a_gguf_base(tmp_path, shipped_smollm2, smollm2_tokenizer):
    """Copied key by key, plus the end-of-turn id the source does not name (`<|im_end|>`, llama.cpp's EOT)."""
    source = gguf_source("smollm2-135m-instruct")
    writer = gguf.GGUFWriter(path=None, arch="llama")
    add_tokenizer(writer, smollm2_tokenizer, len(smollm2_tokenizer), source)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file(path=tmp_path / "t.gguf")
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    copied, _ = read(tmp_path / "t.gguf")
    original, _ = shipped_smollm2
    keys = [k for k in original if k.startswith("tokenizer.")]
    assert len(keys) >= 10 and {k: copied[k] for k in keys} == {k: original[k] for k in keys}
    assert copied["tokenizer.ggml.pre"] == "smollm" and "tokenizer.ggml.eot_token_id" not in original
    assert copied["tokenizer.ggml.eot_token_id"] == smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert copied["tokenizer.chat_template"] == smollm2_tokenizer.chat_template


def test_modelfile_for_smollm2_has_template_system_and_stops(smollm2_tokenizer):
    text = modelfile_text("/models/base.gguf", smollm2_tokenizer, adapter_path="./sentiment.gguf")
    lines = text.splitlines()
    assert "FROM /models/base.gguf" in lines and "ADAPTER ./sentiment.gguf" in lines
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in text
    assert "{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n\"\"\"" in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in lines
    assert [line for line in lines if line.startswith("PARAMETER")] == \
        ['PARAMETER stop "<|im_start|>"', 'PARAMETER stop "<|im_end|>"']


def test_merged_modelfile_points_at_the_gguf_beside_it(tiny_llama_dir, tiny_adapter, tmp_path):
    written = export(tiny_adapter, str(tiny_llama_dir), "gguf", tmp_path / "tuned.gguf")
    assert written == [tmp_path / "tuned.gguf", tmp_path / "tuned.Modelfile"]
    lines = written[1].read_text().splitlines()
    assert "FROM ./tuned.gguf" in lines and not any(line.startswith("ADAPTER") for line in lines)
    assert 'PARAMETER stop "<|im_end|>"' in lines and not any(line.startswith("SYSTEM") for line in lines)


def test_safetensors_export_is_the_merged_model(tiny_llama_dir, tiny_adapter, tmp_path):
    from transformers import LlamaForCausalLM

    import loratune as lt

    export(tiny_adapter, str(tiny_llama_dir), "safetensors", tmp_path / "merged")
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapted = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    lt.load_adapter(adapted, tiny_adapter)
    ids = torch.tensor([[5, 9, 40, 77, 120]])
    with torch.no_grad():
        assert (merged(ids).logits - adapted(ids).logits).abs().max() <= 1e-5


def test_merged_gguf_carries_chat_template_special_ids_and_stops(tiny_llama_dir, tiny_adapter, tmp_path):
    """llama.cpp's chat completion renders `tokenizer.chat_template` and stops at the end-of-turn id."""
    written = export(tiny_adapter, str(tiny_llama_dir), "gguf", tmp_path / "chat.gguf", "f32")
    fields, _ = read(written[0])
    tokenizer = bpe_tokenizer()
    assert fields["tokenizer.chat_template"] == CHATML == tokenizer.chat_template
    ids = {key: fields[f"tokenizer.ggml.{key}_token_id"] for key in ("bos", "eos", "eot", "padding")}
    assert ids == {"bos": 1, "eos": 2, "eot": 2, "padding": 0}
    assert fields["tokenizer.ggml.tokens"][ids["eot"]] == "<|im_end|>"
    assert 'PARAMETER stop "<|im_end|>"' in written[1].read_text().splitlines()


def tokenizer_fields(tmp_path, tokenizer, vocab_size, source, keys):
    """Write only a tokenizer (and one tensor) and read back `keys`."""
    writer = gguf.GGUFWriter(path=None, arch="llama")
    add_tokenizer(writer, tokenizer, vocab_size, source)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file(path=tmp_path / "t.gguf")
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    fields = gguf.GGUFReader(tmp_path / "t.gguf").fields  # only the keys asked for are decoded (the vocabulary
    return {key: fields[key].contents() for key in keys}  # and merges of SmolLM2 take seconds)


def test_smollm2_tokenizer_described_from_its_files_names_its_end_of_turn(tmp_path, smollm2_tokenizer):
    """SmolLM2's real tokenizer written through `gguf.vocab` (the path of a base that is not a GGUF file); the
    copy from its GGUF file is test_tokenizer_keys_copied_from_a_gguf_base."""
    tokenizer = smollm2_tokenizer
    keys = [f"tokenizer.ggml.{name}_token_id" for name in ("eot", "eos", "bos")] + ["tokenizer.chat_template"]
    fields = tokenizer_fields(tmp_path, tokenizer, len(tokenizer), None, keys)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.eot_token_id"] == im_end
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert 'PARAMETER stop "<|im_end|>"' in modelfile_text("./m.gguf", tokenizer).splitlines()


GEMMA_TEMPLATE = ("{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
                  "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
                  "{% endif %}")
PHI3_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.mark.parametrize(("template", "markers", "end_of_turn"), [
    (GEMMA_TEMPLATE, ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
    (PHI3_TEMPLATE, ["<|user|>", "<|assistant|>", "<|end|>"], "<|end|>"),
], ids=["gemma", "phi3"])
def test_modelfile_and_eot_for_gemma_and_phi3_chat_formats(template, markers, end_of_turn):
    from loratune.export.modelfile import end_of_turn_id

    tokenizer = bpe_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": markers})
    tokenizer.chat_template = template
    lines = modelfile_text("./m.gguf", tokenizer).splitlines()
    assert f'PARAMETER stop "{end_of_turn}"' in lines
    assert end_of_turn in "\n".join(lines).split('TEMPLATE """')[1].split('"""')[0]
    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids(end_of_turn) >= 300 - 3
