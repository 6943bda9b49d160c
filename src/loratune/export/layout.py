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

# transformers architecture -> (GGUF architecture, whether q/k rows are reordered for llama.cpp's rotary
# layout). Llama-style checkpoints rotate halves of each head, llama.cpp's "llama" graph rotates adjacent
# pairs, so its converter permutes q_proj/k_proj rows; Qwen2 uses the halves layout natively.
_ARCHITECTURES: dict[str, tuple[gguf.MODEL_ARCH, bool]] = {
    "LlamaForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "MistralForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "Qwen2ForCausalLM": (gguf.MODEL_ARCH.QWEN2, False),
}


@dataclass(frozen=True)
class GGUFLayout:
    """One model's GGUF architecture and the shapes that its tensor names and q/k order depend on."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool
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
    if arch_name not in _ARCHITECTURES:
        raise ConfigError(f"model architecture {arch_name!r}: GGUF export supports the Llama family "
                          f"({', '.join(_ARCHITECTURES)})")
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"model config rope_parameters: rope_type {rope['rope_type']!r} is not supported by "
                          "GGUF export (only the default rotary embedding)")
    arch, permute = _ARCHITECTURES[arch_name]
    n_blocks = config.num_hidden_layers
    n_head = config.num_attention_heads
    return GGUFLayout(arch=arch, permute_qk=permute, n_blocks=n_blocks, n_head=n_head,
                      n_head_kv=getattr(config, "num_key_value_heads", None) or n_head,
                      tensor_names=gguf.get_tensor_name_map(arch, n_blocks))


def rope_parameters(config: Any) -> dict[str, Any]:
    """transformers 5 keeps rope settings in `rope_parameters`; older configs have `rope_theta`/`rope_scaling`."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params
