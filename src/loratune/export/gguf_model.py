"""A transformers causal LM (a family in `layout.ARCHITECTURES`) as one GGUF file: hyperparameters, tokenizer,
chat template, weights.

What llama.cpp's own converter writes for these architectures, through the `gguf` package's writer, tensor
name maps and vocabulary readers. A tokenizer that came from a GGUF file is copied from it key by key, so the
runtime tokenizes exactly as it did for the original file (pre-tokenizer included).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from loratune.core.errors import ConfigError
from loratune.errors import ModelLoadError
from loratune.export.layout import GGUFLayout, rope_parameters
from loratune.export.modelfile import end_of_turn_id

#: --dtype -> (element type of 2-D weights, GGUF file type)
DTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


def write_tensors_and_close(writer: gguf.GGUFWriter, path: str | Path, tensors: dict[str, Any], dtype: str) -> None:
    """Add the tensors in `dtype`, then write header, metadata and tensors to `path` and close the writer."""
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for tensor_name, array in tensors.items():
        data, qtype = encode_tensor(tensor_name, array, dtype)
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def encode_tensor(name: str, array: np.ndarray, dtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Encode one tensor as llama.cpp's converter does: vectors and norms stay f32; a row that q8_0's
    32-element blocks do not divide falls back to f16."""
    qtype = DTYPES[dtype][0]
    if array.ndim <= 1 or name.endswith("_norm.weight"):
        qtype = gguf.GGMLQuantizationType.F32
    array = np.ascontiguousarray(array, dtype=np.float32)
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def add_hyperparameters(writer: gguf.GGUFWriter, config: Any, arch: gguf.MODEL_ARCH) -> None:
    """The `{arch}.*` keys llama.cpp reads to build the graph."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary = int(head_dim * float(getattr(config, "partial_rotary_factor", None) or 1.0))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(float(rope_parameters(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(rotary)
    if head_dim != config.hidden_size // config.num_attention_heads or arch in _GEMMA:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    add_family_keys(writer, config, arch)


_GEMMA = (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3)


def add_family_keys(writer: gguf.GGUFWriter, config: Any, arch: gguf.MODEL_ARCH) -> None:
    """Gemma's soft-capping and sliding window, Phi-3's original context and sliding window (0: none), as
    llama.cpp's converter writes them. Gemma's embedding scaling by sqrt(hidden size) is in llama.cpp's graph."""
    if arch == gguf.MODEL_ARCH.GEMMA2:
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
    elif arch == gguf.MODEL_ARCH.GEMMA3:
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
    elif arch == gguf.MODEL_ARCH.PHI3:
        original = getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)


def model_tensors(model: torch.nn.Module, layout: GGUFLayout) -> dict[str, np.ndarray]:
    """Every weight under its GGUF name, q/k rows reordered; a tied output head is left to token_embd."""
    tensors: dict[str, np.ndarray] = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        name = layout.gguf_name(hf_name)
        if name is None:
            raise ConfigError(f"model tensor {hf_name!r} has no llama.cpp {layout.arch_name} tensor name")
        tensors[name] = layout.model_values(name, tensor.detach().float().cpu().numpy())
    return tensors


def write_model_gguf(model: torch.nn.Module, tokenizer: Any, layout: GGUFLayout, path: Path, dtype: str,
                     tokenizer_gguf: Path | None = None, name: str | None = None) -> None:
    """Write `model` (already merged) with its tokenizer to `path`.

    `tokenizer_gguf`: the GGUF file the base model came from, whose `tokenizer.*` keys are copied as they are;
    otherwise the tokenizer is described from its saved files by the `gguf` package's vocabulary readers.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: a GGUF model is written as one of {', '.join(DTYPES)}")
    config = model.config
    writer = gguf.GGUFWriter(path=None, arch=layout.arch_name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or getattr(config, "name_or_path", None) or "model")
    add_hyperparameters(writer, config, layout.arch)
    writer.add_file_type(DTYPES[dtype][1])
    add_tokenizer(writer, tokenizer, config.vocab_size, tokenizer_gguf)
    write_tensors_and_close(writer, path, model_tensors(model, layout), dtype)


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int, tokenizer_gguf: Path | None) -> None:
    """The `tokenizer.*` keys, plus the end-of-turn id of the chat format (llama.cpp stops a chat reply there)
    when the source does not name one."""
    if tokenizer_gguf is not None:
        copied = copy_tokenizer_keys(writer, tokenizer_gguf)
    else:
        copied = add_tokenizer_from_files(writer, tokenizer, vocab_size)
    eot = end_of_turn_id(tokenizer)
    if eot is not None and gguf.Keys.Tokenizer.EOT_ID not in copied:
        writer.add_eot_token_id(eot)


def copy_tokenizer_keys(writer: gguf.GGUFWriter, source: Path) -> set[str]:
    """Copy every `tokenizer.*` key of another GGUF file (vocabulary, merges, special ids, chat template)."""
    reader = gguf.GGUFReader(source)
    copied = set()
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main_type = field.types[0]
        sub_type = field.types[-1] if main_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), main_type, sub_type=sub_type)
        copied.add(key)
    return copied


def add_tokenizer_from_files(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> set[str]:
    """Describe a transformers fast tokenizer with `gguf.vocab` (GPT-2 style BPE or Llama byte-fallback BPE);
    `gguf.SpecialVocab` writes the bos/eos/unk/pad ids and `tokenizer.chat_template`. Returns no keys copied.

    llama.cpp picks its pre-tokenizer from a name that its converter derives from a table of known tokenizers;
    loratune writes "default" for GPT-2 style BPE, which splits text as GPT-2 does.
    """
    with tempfile.TemporaryDirectory(prefix="loratune-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        files = Path(folder)
        if not (files / "tokenizer.json").is_file():
            raise ModelLoadError("tokenizer: GGUF export needs a fast tokenizer (tokenizer.json)")
        kind = json.loads((files / "tokenizer.json").read_text(encoding="utf-8"))["model"]
        if kind.get("type") != "BPE":
            raise ModelLoadError(f"tokenizer: a {kind.get('type')} tokenizer.json is not supported by GGUF export "
                                 "(BPE only)")
        vocab = gguf.LlamaHfVocab(files) if kind.get("byte_fallback") else gguf.BpeVocab(files)
        tokens, scores, types = [], [], []
        for text, score, token_type in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(token_type)
        for token_id, added in tokenizer.added_tokens_decoder.items():  # chat markers are control tokens
            if added.special and token_id < len(types):
                types[token_id] = gguf.TokenType.CONTROL
        for i in range(len(tokens), vocab_size):  # embedding rows past the tokenizer's vocabulary
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        if vocab.tokenizer_model == "gpt2":
            writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        gguf.SpecialVocab(files, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    return set()
