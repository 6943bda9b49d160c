"""The tasks loratune trains for, and the constants every layer agrees on: one definition each."""

from __future__ import annotations

from typing import Literal

Task = Literal["causal-lm", "classification", "seq2seq"]
TASKS: tuple[str, ...] = Task.__args__  # type: ignore[attr-defined]

#: PEFT's `task_type` for each task, written into `adapter_config.json` when the config names none.
TASK_TYPES: dict[str, str] = {"causal-lm": "CAUSAL_LM", "classification": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}

#: Label id the loss skips (prompt tokens, padding): the default `ignore_index` of torch's cross-entropy.
IGNORE_INDEX = -100
