"""Forgetting, measured: a causal LM's perplexity on general text that is not part of the task, before and
after training ("learns the task, keeps the rest" as a number, not a claim).

The text is `train.general_text`: a file, or `builtin`, a short sample of everyday English prose that ships
with loratune (`general_text.txt`, about 2,500 characters, written for this purpose). It is cut into blocks of
`data.max_length` tokens (or the model's limit) and scored like the evaluation loss, every token predicted.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any

from loratune.core.errors import ConfigError
from loratune.train.evaluate import loss_totals

BUILTIN = "builtin"


def read_general_text(source: str) -> str:
    """The general text a config names (a file, or the built-in sample)."""
    if source == BUILTIN:
        return resources.files(__package__).joinpath("general_text.txt").read_text(encoding="utf-8")
    path = Path(source).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"train.general_text: cannot read {source!r} ({type(exc).__name__})") from None


def general_blocks(text: str, tokenizer: Any, block: int) -> list[dict[str, list[int]]]:
    """The text's tokens as examples of at most `block` tokens, every token a label."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    blocks = [ids[start:start + block] for start in range(0, len(ids), block)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks if len(b) > 1]


def general_text_metrics(session: Any) -> dict[str, float]:
    """`general_perplexity` of the session's model on its config's general text (causal LMs; else nothing)."""
    config = session.config
    source = config.train.general_text
    if source is None or config.model.task != "causal-lm":
        return {}
    examples = general_blocks(read_general_text(source), session.tokenizer, config.data.max_length)
    if not examples:
        return {}
    totals = loss_totals(session.forwards(), examples, session.batches, task="causal-lm")
    return {"general_perplexity": math.exp(min(totals.loss / max(totals.weight, 1), 50.0))}
