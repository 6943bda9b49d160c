"""A 2-layer random config of every family GGUF export supports (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3,
Phi-3), defined once for the runtime agreement benchmark (runtimes.py) and the GGUF export test
(tests/export/test_gguf_families.py), which differ only in sizes.
"""

from __future__ import annotations

from typing import Any


def gguf_family_configs(hidden_size: int, max_positions: int, sliding_window: int, phi3_context: int,
                        **extra: Any) -> dict[str, Any]:
    """family -> transformers config: 4 query heads and 2 key-value heads, an MLP twice `hidden_size`,
    `sliding_window` for the families that have one, Phi-3's original context `phi3_context`; `extra` goes to
    every config (token ids, `initializer_range`)."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    sizes = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions, **extra)
    gemma = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=sliding_window, tie_word_embeddings=True)
    return {"llama": LlamaConfig(**sizes, tie_word_embeddings=False),
            "mistral": MistralConfig(**sizes, sliding_window=sliding_window, tie_word_embeddings=False),
            "qwen2": Qwen2Config(**sizes, tie_word_embeddings=False),
            "qwen3": Qwen3Config(**sizes, head_dim=16, tie_word_embeddings=False),
            "gemma2": Gemma2Config(**sizes, **gemma, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
            "gemma3": Gemma3TextConfig(**sizes, **gemma),
            "phi3": Phi3Config(**sizes, original_max_position_embeddings=phi3_context, tie_word_embeddings=False)}
