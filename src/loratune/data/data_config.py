"""`DataConfig`: where the records come from and how they become training examples."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Format = Literal["text", "prompt_completion", "instruction", "chat", "classification", "translation"]
FORMATS: tuple[str, ...] = Format.__args__  # type: ignore[attr-defined]


class DataConfig(BaseModel):
    """Data settings of a run; unknown keys are rejected so a typo cannot go unnoticed."""

    model_config = ConfigDict(extra="forbid")

    train: str | None = None  # a file (.jsonl .json .csv .tsv .parquet) or a built-in name
    validation: str | None = None  # same; when absent, `validation_fraction` of train is held out
    format: Format | None = None  # a built-in dataset brings its own
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    max_train_records: int | None = Field(None, ge=1)
    max_eval_records: int | None = Field(None, ge=1)
    seed: int = 0
    skip_bad_records: bool = False

    max_length: int = Field(512, ge=8)
    concatenate_texts: bool = True  # `text` only: concatenate documents and cut into max_length blocks
    train_on_prompt: bool = False  # also learn the prompt/user tokens, not just the answer
    use_chat_template: bool = False  # prompt/answer pairs become a user turn and the assistant's reply

    text_field: str = "text"
    label_field: str = "label"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    messages_field: str = "messages"
    source_field: str = "source"
    target_field: str = "target"

    label_names: list[str] | None = None  # else taken from the data (built-in, or sorted train labels)
    prompt_template: str | None = None  # e.g. "Review: {text}\nSentiment:" (record fields substituted)
    completion_template: str | None = None  # e.g. " {label}" (label ids shown as their names)
    source_language: str = "English"
    target_language: str = "Spanish"

    @model_validator(mode="after")
    def _templates_come_in_pairs(self) -> DataConfig:
        if (self.prompt_template is None) != (self.completion_template is None):
            raise ValueError("prompt_template and completion_template must be given together")
        if self.label_names is not None and len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"label_names has duplicates: {self.label_names}")
        return self
