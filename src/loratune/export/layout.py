"""How a transformers causal LM maps onto llama.cpp's GGUF layout: architecture, tensor names, q/k row order.

The tensor names come from the `gguf` package's own maps (the ones llama.cpp's converter uses); this module
only decides which architecture a model is and applies the one reordering llama.cpp's Llama graph needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from loratune.core.errors import ConfigError


@dataclass(frozen=True)
class ArchSpec:
    """What llama.cpp's converter does differently per family.

    `permute_qk`: Llama-style checkpoints rotate halves of each head, llama.cpp's "llama" graph rotates adjacent
    pairs, so its converter permutes q_proj/k_proj rows; the other families use the halves layout natively.
    `norm_shift`: Gemma's RMSNorm multiplies by (1 + weight); llama.cpp's by weight, so norms are stored + 1.
    """

    arch: gguf.MODEL_ARCH
    permute_qk: bool = False
    norm_shift: float = 0.0


#: transformers architecture -> what llama.cpp expects (the families its converter supports that loratune
#: writes; Phi-3's fused qkv_proj / gate_up_proj map to attn_qkv / ffn_up as they are)
ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "MistralForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "Qwen2ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN2),
    "Qwen3ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN3),
    "Gemma2ForCausalLM": ArchSpec(gguf.MODEL_ARCH.GEMMA2, norm_shift=1.0),
    "Gemma3ForCausalLM": ArchSpec(gguf.MODEL_ARCH.GEMMA3, norm_shift=1.0),
    "Phi3ForCausalLM": ArchSpec(gguf.MODEL_ARCH.PHI3),
}


@dataclass(frozen=True)
class GGUFLayout:
    """One model's GGUF architecture and the shapes that its tensor names and q/k order depend on."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool
    norm_shift: float
    n_blocks: int
    n_head: int
    n_head_kv: int
    tensor_names: gguf.TensorNameMap

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    def gguf_name(self, hf_name: str) -> str | None:
        """`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`; None if llama.cpp has no such tensor."""
        return self.tensor_names.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def model_values(self, gguf_name: str, array: np.ndarray) -> np.ndarray:
        """A merged model's tensor as llama.cpp reads it: q/k rows reordered, Gemma norms shifted by one."""
        if self.norm_shift and gguf_name.endswith("norm.weight"):
            array = array + np.float32(self.norm_shift)
        return self.reorder_rows(gguf_name, array)

    def reorder_rows(self, gguf_name: str, rows: np.ndarray) -> np.ndarray:
        """Permute the output rows of attn_q / attn_k (weights, biases, LoRA B) the way llama.cpp expects."""
        if not self.permute_qk:
            return rows
        if gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
            heads = self.n_head
        elif gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
            heads = self.n_head_kv
        else:
            return rows
        shape = rows.shape
        return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def layout_for(config: Any) -> GGUFLayout:
    """The GGUF layout of a transformers config; a one-line `ConfigError` for architectures GGUF export lacks."""
    archs = getattr(config, "architectures", None) or []
    arch_name = archs[0] if archs else getattr(config, "model_type", "unknown")
    if arch_name not in ARCHITECTURES:
        raise ConfigError(f"model architecture {arch_name!r} is not supported by GGUF export (supported: "
                          f"{', '.join(ARCHITECTURES)})")
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"model config rope_parameters: rope_type {rope['rope_type']!r} is not supported by "
                          "GGUF export (only the default rotary embedding)")
    spec = ARCHITECTURES[arch_name]
    if spec.arch == gguf.MODEL_ARCH.GEMMA3:
        check_gemma3_local_rope(config)
    n_blocks = config.num_hidden_layers
    n_head = config.num_attention_heads
    return GGUFLayout(arch=spec.arch, permute_qk=spec.permute_qk, norm_shift=spec.norm_shift, n_blocks=n_blocks,
                      n_head=n_head,
                      n_head_kv=getattr(config, "num_key_value_heads", None) or n_head,
                      tensor_names=gguf.get_tensor_name_map(spec.arch, n_blocks))


def rope_parameters(config: Any) -> dict[str, Any]:
    """The (global layers') rope settings: transformers 5 keeps them in `rope_parameters`, per attention kind
    for Gemma 3; older configs have `rope_theta`/`rope_scaling`."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params = dict(params.get("full_attention", params))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def check_gemma3_local_rope(config: Any) -> None:
    """llama.cpp's gemma3 graph gives sliding-window layers a fixed rope base of 10000, with no key to change it."""
    params = getattr(config, "rope_parameters", None) or {}
    local = dict(params.get("sliding_attention", {}))
    theta = local.get("rope_theta", getattr(config, "rope_local_base_freq", 10000.0))
    if float(theta) != 10000.0 or local.get("rope_type", "default") != "default":
        raise ConfigError(f"model config rope_parameters.sliding_attention: {local} is not supported by GGUF export "
                          "(llama.cpp's gemma3 uses rope_theta 10000 and the default rotary embedding there)")
