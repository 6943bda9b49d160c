"""Turn one record into one training example, by format (the record's shape) and task (the model's head).

Generative formats first become a (prompt, answer) pair of texts; the task then decides the tokens:
a causal LM learns prompt+answer with loss on the answer only, a seq2seq model reads the prompt and
predicts the answer. Every problem with a record is a `DataError` naming its file, line and field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loratune.core.errors import ConfigError
from loratune.data.data_config import DataConfig
from loratune.data.labels import LabelMap
from loratune.data.records import Record, record_error
from loratune.tasks import IGNORE_INDEX

ROLES = ("system", "user", "assistant", "tool")
DEFAULT_PROMPT_TEMPLATE = "Text: {text}\nLabel:"
DEFAULT_COMPLETION_TEMPLATE = " {label}"
ALPACA_HEAD = (
    "Below is an instruction that describes a task{extra}. Write a response that appropriately completes the request."
)
ALPACA_EXTRA = ", paired with an input that provides further context"

# Which formats each task can train on.
TASK_FORMATS: dict[str, tuple[str, ...]] = {
    "causal-lm": ("text", "prompt_completion", "instruction", "chat", "classification", "translation"),
    "seq2seq": ("prompt_completion", "instruction", "classification", "translation"),
    "classification": ("classification",),
}


@dataclass
class Formatted:
    """A training example plus, for generative formats, the prompt ids and reference answer for eval."""

    example: dict[str, Any]
    prompt_ids: list[int] | None = None
    reference: str | None = None
    truncated: bool = False


def check_task_format(task: str, fmt: str) -> None:
    if fmt not in TASK_FORMATS[task]:
        allowed = ", ".join(TASK_FORMATS[task])
        raise ConfigError(f"data.format: {fmt!r} cannot train a {task} model; use one of {allowed}")


class Formatter:
    """Formats records of one dataset; built once per run with the tokenizer and label names."""

    def __init__(self, cfg: DataConfig, tokenizer: Any, task: str, fmt: str, labels: LabelMap | None) -> None:
        check_task_format(task, fmt)
        self.cfg, self.tokenizer, self.task, self.format, self.labels = cfg, tokenizer, task, fmt, labels
        self.eos = tokenizer.eos_token_id
        if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("data.format: 'chat' needs a tokenizer with a chat template; this one has none")
        if cfg.use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("data.use_chat_template: this model's tokenizer has no chat template")

    def __call__(self, record: Record) -> Formatted:
        if self.format == "text":
            return self._text(record)
        if self.format == "chat":
            return self._chat(record)
        if self.task == "classification":
            return self._classify(record)
        prompt, answer = self._pair(record)
        if self.task == "seq2seq":
            return self._seq2seq(prompt, answer)
        return self._causal(prompt, answer)

    def label_answer_ids(self, name: str) -> list[int] | None:
        """The answer tokens a causal LM learns for label `name` (without the closing EOS), or None when
        the answer is not the label alone (a completion template that reads other fields)."""
        if self.task != "causal-lm" or self.format != "classification" or self.labels is None:
            return None
        template = self.cfg.completion_template if self.cfg.prompt_template is not None \
            else DEFAULT_COMPLETION_TEMPLATE
        try:
            answer = template.format_map({"label": name, self.cfg.label_field: name})
        except (KeyError, ValueError, IndexError):
            return None
        ids = self._ids(answer.strip() if self.cfg.use_chat_template else answer, special=False)
        return ids or None

    # ---- fields -------------------------------------------------------------------------------

    def _string(self, record: Record, field: str, *, required: bool = True, empty_ok: bool = False) -> str:
        if field not in record.fields or record.fields[field] is None:
            if not required:
                return ""
            raise record_error(record.where, field, "missing")
        value = record.fields[field]
        if not isinstance(value, str):
            raise record_error(record.where, field, f"expected a string, got {type(value).__name__}")
        if not empty_ok and not value.strip():
            raise record_error(record.where, field, "is empty")
        return value

    def _label_id(self, record: Record) -> int:
        field = self.cfg.label_field
        if field not in record.fields or record.fields[field] is None:
            raise record_error(record.where, field, "missing")
        assert self.labels is not None
        return self.labels.to_id(record.fields[field], record, field)

    # ---- record -> (prompt, answer) -----------------------------------------------------------

    def _pair(self, record: Record) -> tuple[str, str]:
        if self.cfg.prompt_template is not None:
            return self._templated(record, self.cfg.prompt_template, self.cfg.completion_template or "")
        if self.format == "prompt_completion":
            return self._string(record, self.cfg.prompt_field), self._string(record, self.cfg.completion_field)
        if self.format == "instruction":
            return self._instruction(record)
        if self.format == "translation":
            source = self._string(record, self.cfg.source_field)
            prompt = f"Translate {self.cfg.source_language} to {self.cfg.target_language}:\n{source}\n"
            return prompt, self._string(record, self.cfg.target_field)
        return self._templated(record, DEFAULT_PROMPT_TEMPLATE, DEFAULT_COMPLETION_TEMPLATE)

    def _instruction(self, record: Record) -> tuple[str, str]:
        instruction = self._string(record, self.cfg.instruction_field)
        extra = self._string(record, self.cfg.input_field, required=False, empty_ok=True).strip()
        parts = [ALPACA_HEAD.format(extra=ALPACA_EXTRA if extra else ""), f"### Instruction:\n{instruction}"]
        if extra:
            parts.append(f"### Input:\n{extra}")
        parts.append("### Response:\n")
        return "\n\n".join(parts), self._string(record, self.cfg.output_field)

    def _templated(self, record: Record, prompt_template: str, completion_template: str) -> tuple[str, str]:
        values = self._template_values(record)
        texts = []
        for key, template in (("prompt_template", prompt_template), ("completion_template", completion_template)):
            try:
                texts.append(template.format_map(values))
            except KeyError as exc:
                raise record_error(record.where, str(exc.args[0]), f"missing (used by {key})") from exc
            except (ValueError, IndexError) as exc:
                raise ConfigError(f"data.{key}: invalid template {template!r} ({exc})") from exc
        return texts[0], texts[1]

    def _template_values(self, record: Record) -> dict[str, Any]:
        """Record fields, the standard names for the configured fields, labels as names, languages."""
        cfg = self.cfg
        values = dict(record.fields)
        aliases = {"text": cfg.text_field, "prompt": cfg.prompt_field, "completion": cfg.completion_field,
                   "source": cfg.source_field, "target": cfg.target_field}
        for standard, field in aliases.items():
            if field in record.fields:
                values[standard] = record.fields[field]
        if self.labels is not None and cfg.label_field in record.fields:
            values["label"] = values[cfg.label_field] = self.labels.name(self._label_id(record))
        values.update(source_language=cfg.source_language, target_language=cfg.target_language)
        return values

    # ---- tokens -------------------------------------------------------------------------------

    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _causal(self, prompt: str, answer: str) -> Formatted:
        if self.cfg.use_chat_template:  # the template brings its own special tokens
            prompt = self._render([{"role": "user", "content": prompt.strip()}], generation_prompt=True)
            answer = answer.strip()
        prompt_ids = self._ids(prompt, special=not self.cfg.use_chat_template)
        answer_ids = self._ids(answer, special=False) + ([self.eos] if self.eos is not None else [])
        keep_bos = self._bos_first(prompt_ids)
        fitted_prompt, fitted_answer = fit_pair(prompt_ids, answer_ids, self.cfg.max_length, keep_bos)
        prompt_labels = fitted_prompt if self.cfg.train_on_prompt else [IGNORE_INDEX] * len(fitted_prompt)
        example = {"input_ids": fitted_prompt + fitted_answer, "labels": prompt_labels + fitted_answer}
        truncated = len(fitted_prompt) + len(fitted_answer) < len(prompt_ids) + len(answer_ids)
        return Formatted(example, fitted_prompt, answer.strip(), truncated)

    def _bos_first(self, ids: list[int]) -> bool:
        bos = self.tokenizer.bos_token_id
        return bos is not None and bool(ids) and ids[0] == bos

    def _seq2seq(self, prompt: str, answer: str) -> Formatted:
        length = self.cfg.max_length
        inputs, truncated = self._bounded(prompt)
        labels = list(self.tokenizer(text_target=answer, truncation=True, max_length=length)["input_ids"])
        if self.eos is not None and (not labels or labels[-1] != self.eos):
            labels = labels[: length - 1] + [self.eos]
        return Formatted({"input_ids": inputs, "labels": labels}, inputs, answer.strip(), truncated)

    def _bounded(self, text: str) -> tuple[list[int], bool]:
        """Token ids cut to max_length by the tokenizer (which keeps its closing special token), and
        whether anything was cut: one extra token of room tells."""
        length = self.cfg.max_length
        ids = self.tokenizer(text, truncation=True, max_length=length + 1)["input_ids"]
        if len(ids) <= length:
            return list(ids), False
        return list(self.tokenizer(text, truncation=True, max_length=length)["input_ids"]), True

    def _classify(self, record: Record) -> Formatted:
        text = self._string(record, self.cfg.text_field)
        label = self._label_id(record)
        ids, truncated = self._bounded(text)
        return Formatted({"input_ids": ids, "label": label}, truncated=truncated)

    def _text(self, record: Record) -> Formatted:
        """A document with EOS appended; cut to max_length here only when documents are not concatenated."""
        ids = self._ids(self._string(record, self.cfg.text_field), special=True)
        if self.eos is not None:
            ids.append(self.eos)
        truncated = not self.cfg.concatenate_texts and len(ids) > self.cfg.max_length
        if truncated:
            ids = ids[: self.cfg.max_length]
        return Formatted({"input_ids": ids, "labels": list(ids)}, truncated=truncated)

    # ---- chat ---------------------------------------------------------------------------------

    def _chat(self, record: Record) -> Formatted:
        messages = self._messages(record)
        text = self._render(messages, generation_prompt=False)
        spans = [] if self.cfg.train_on_prompt else self._assistant_spans(record, messages, text)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        if self.cfg.train_on_prompt:
            labels = list(ids)
        else:
            labels = [tok if _inside(start, spans) else IGNORE_INDEX
                      for tok, (start, _) in zip(ids, encoded["offset_mapping"])]
        length = self.cfg.max_length
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt_ids = self._ids(self._render(messages[:last], generation_prompt=True), special=False)
        example = {"input_ids": ids[:length], "labels": labels[:length]}
        return Formatted(example, prompt_ids[-length:], messages[last]["content"].strip(), len(ids) > length)

    def _messages(self, record: Record) -> list[dict[str, str]]:
        field = self.cfg.messages_field
        value = record.fields.get(field)
        if value is None:
            raise record_error(record.where, field, "missing")
        if not isinstance(value, list) or not value:
            raise record_error(record.where, field, "expected a non-empty list of {role, content} objects")
        messages = []
        for i, message in enumerate(value):
            name = f"{field}[{i}]"
            if not isinstance(message, dict):
                raise record_error(record.where, name, f"expected an object, got {type(message).__name__}")
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise record_error(record.where, f"{name}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
            if not isinstance(content, str):
                raise record_error(record.where, f"{name}.content", f"expected a string, got {type(content).__name__}")
            messages.append({"role": role, "content": content})
        if not any(m["role"] == "assistant" for m in messages):
            raise record_error(record.where, field, "has no assistant message to learn from")
        return messages

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _assistant_spans(self, record: Record, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
        """Character spans of the assistant turns in `text`, found by rendering the conversation up to
        each turn: the text before the turn (with the generation prompt) and the text through it."""
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], generation_prompt=True) if i else ""
            through = self._render(messages[: i + 1], generation_prompt=False)
            if not (text.startswith(before) and text.startswith(through)):
                raise record_error(record.where, self.cfg.messages_field,
                                   "the chat template does not render turns as prefixes; set train_on_prompt")
            spans.append((len(before), len(through)))
        return spans


def _inside(position: int, spans: list[tuple[int, int]]) -> bool:
    return any(start <= position < end for start, end in spans)


def fit_pair(prompt: list[int], answer: list[int], max_length: int, keep_first: bool) -> tuple[list[int], list[int]]:
    """Cut prompt+answer to `max_length`: the answer keeps at least half the room (and its last
    token, the EOS); the prompt loses its beginning, except a leading BOS, so the text nearest the
    answer survives."""
    if len(prompt) + len(answer) <= max_length:
        return prompt, answer
    room = min(len(answer), max(max_length - len(prompt), max_length // 2))
    if room < len(answer):
        answer = answer[: room - 1] + answer[-1:]
    keep = max_length - len(answer)
    if keep_first and keep > 0:
        return prompt[:1] + prompt[len(prompt) - (keep - 1):], answer
    return prompt[len(prompt) - keep:], answer
