"""An Ollama Modelfile for a GGUF export: FROM, ADAPTER, the chat template in Ollama's Go syntax, stop words.

Ollama templates are Go templates, not the Jinja of `tokenizer.chat_template`, so the chat format is
recognised by its marker tokens (ChatML, Llama 3, Mistral [INST], Gemma, Phi-3) and written in Ollama's form for it. A
default system prompt that the Jinja template inserts is found by rendering a probe conversation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ChatFormat:
    marker: str
    template: str
    stops: tuple[str, ...]
    end_of_turn: str  # the token that ends an assistant turn: llama.cpp's EOT, always one of `stops`
    system_prefix: str  # how the rendered system turn starts, to find a default system prompt
    system_suffix: str


CHAT_FORMATS = (
    ChatFormat(
        marker="<|im_start|>",
        template=("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
                  "{{ end }}<|im_start|>assistant\n"),
        stops=("<|im_start|>", "<|im_end|>"), end_of_turn="<|im_end|>",
        system_prefix="<|im_start|>system\n", system_suffix="<|im_end|>",
    ),
    ChatFormat(
        marker="<|start_header_id|>",
        template=("<|begin_of_text|>{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
                  "{{ .Content }}<|eot_id|>{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"),
        stops=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), end_of_turn="<|eot_id|>",
        system_prefix="<|start_header_id|>system<|end_header_id|>\n\n", system_suffix="<|eot_id|>",
    ),
    ChatFormat(
        marker="[INST]",
        template=('{{- range .Messages }}{{- if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
                  '{{- else if eq .Role "assistant" }}{{ .Content }}</s>{{- end }}{{- end }}'),
        stops=("[INST]", "[/INST]", "</s>"), end_of_turn="</s>",
        system_prefix="", system_suffix="",
    ),
    ChatFormat(
        marker="<start_of_turn>",
        template=('{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}'
                  '{{ end }}\n{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n'),
        stops=("<start_of_turn>", "<end_of_turn>"), end_of_turn="<end_of_turn>",
        system_prefix="", system_suffix="",
    ),
    ChatFormat(
        marker="<|end|>",
        template="{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
        stops=("<|user|>", "<|assistant|>", "<|end|>"), end_of_turn="<|end|>",
        system_prefix="<|system|>\n", system_suffix="<|end|>",
    ),
)


def chat_format(tokenizer: Any) -> ChatFormat | None:
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return None
    return next((fmt for fmt in CHAT_FORMATS if fmt.marker in template), None)


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The id of the token that ends an assistant turn in this tokenizer's chat format, if it has one."""
    fmt = chat_format(tokenizer)
    if fmt is None:
        return None
    token_id = tokenizer.convert_tokens_to_ids(fmt.end_of_turn)
    return token_id if isinstance(token_id, int) and token_id != tokenizer.unk_token_id else None


def default_system_prompt(tokenizer: Any, fmt: ChatFormat) -> str | None:
    """The system prompt the Jinja template adds when a conversation has none (SmolLM2 has one)."""
    if not fmt.system_prefix:
        return None
    probe = "loratune-probe"
    text = tokenizer.apply_chat_template([{"role": "user", "content": probe}], tokenize=False)
    start = text.find(fmt.system_prefix)
    if start < 0 or start > text.find(probe):
        return None
    body = text[start + len(fmt.system_prefix):]
    end = body.find(fmt.system_suffix)
    return body[:end] if end > 0 else None


def modelfile_text(from_path: str, tokenizer: Any, adapter_path: str | None = None) -> str:
    """The Modelfile; `ollama create NAME -f FILE` reads relative paths from FILE's folder."""
    lines = ["# Ollama Modelfile written by `loratune export`; load it with: ollama create NAME -f THIS_FILE",
             f"FROM {from_path}"]
    if adapter_path is not None:
        lines.append(f"ADAPTER {adapter_path}")
    fmt = chat_format(tokenizer)
    if fmt is None:
        lines.append("# no TEMPLATE: the chat format is not one loratune knows; Ollama reads the GGUF's "
                     "tokenizer.chat_template")
        stops: tuple[str, ...] = ()
    else:
        lines.append(f'TEMPLATE """{fmt.template}"""')
        system = default_system_prompt(tokenizer, fmt)
        if system:
            lines.append(f'SYSTEM """{system}"""')
        stops = fmt.stops
    eos = getattr(tokenizer, "eos_token", None)
    for stop in dict.fromkeys([*stops, *([eos] if eos else [])]):
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"
