"""Generate text with a model and an optional adapter, streaming tokens as they are produced."""

from __future__ import annotations

from typing import TextIO

import torch

from loratune.batching import max_positions
from loratune.core.peft_format import load_adapter, read_adapter_config
from loratune.precision import inference_dtype
from loratune.pretrained import load_model


def prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """Token ids for a plain prompt, or for one user turn rendered with the model's chat template."""
    from loratune.core.errors import ConfigError

    if not prompt.strip():
        raise ConfigError("--prompt: the prompt is empty")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("--chat: this model's tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(prompt, return_tensors="pt").input_ids


@torch.no_grad()
def generate_stream(model_name: str, prompt: str, adapter: str | None, chat: bool, max_new_tokens: int,
                    out: TextIO, task: str | None = None, quantize: str = "none", precision: str = "fp32") -> str:
    """Greedy generation; each new piece of text is written to `out` as soon as it is decoded.

    `task` (causal-lm or seq2seq) defaults to the adapter's task type, else causal-lm; `quantize` (nf4, int8)
    stores the base's linear layers quantized and `precision` picks the base's dtype
    (`precision.inference_dtype`), as `loratune serve --quantize --precision` do.
    """
    from transformers import TextStreamer

    if task is None:
        task = "seq2seq" if adapter and read_adapter_config(adapter).task_type == "SEQ_2_SEQ_LM" else "causal-lm"
    model, tokenizer = load_model(model_name, task, quantize=quantize, dtype=inference_dtype(precision))
    if adapter:
        load_adapter(model, adapter)
    model.eval()
    ids = prompt_ids(tokenizer, prompt, chat)
    limit = max_positions(model)
    if limit is not None and not model.config.is_encoder_decoder and ids.shape[1] + max_new_tokens > limit:
        from loratune.core.errors import ConfigError

        raise ConfigError(f"--max-new-tokens: the prompt ({ids.shape[1]} tokens) plus {max_new_tokens} new tokens "
                          f"exceed the model's {limit} positions")

    class _Writer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                            streamer=_Writer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    new_tokens = output[0] if model.config.is_encoder_decoder else output[0, ids.shape[1]:]
    return tokenizer.decode(new_tokens, skip_special_tokens=True)
