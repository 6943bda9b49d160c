"""docs/config.md, generated from the config models, so the page lists exactly the keys a run accepts.

A key's meaning comes from its pydantic `Field(description=...)`, else from `MEANINGS` below, else from the
comment on its line in the model's source (a `MEANINGS` entry overrides a comment written for a reader of the
source, never a description). A key with no meaning, or a `MEANINGS` entry for a key that no
longer exists, is an error: `python -m loratune.config_docs --check` (the test) fails on either and on a
stale page. Regenerate with `make config-docs`.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from loratune.core.atomic_write import write_text_atomic
from loratune.core.lora_config import LoraConfig
from loratune.data import DataConfig
from loratune.train.run_config import DEFAULT_LOSS_CHUNK, ModelSpec, RunConfig, TrainSpec

DOC_PATH = Path("docs/config.md")
REGENERATE = "make config-docs"

# Meanings of keys whose model gives none (no description, no comment). Keyed by the YAML path.
MEANINGS: dict[str, str] = {
    "output_dir": "the run's folder: adapter, checkpoints, metrics, plot, report and the resolved config",
    "model.task": "what the model learns: causal-lm (next tokens), classification (a head over the "
                  "encoder) or seq2seq (encoder-decoder)",
    "model.trust_remote_code": "run the model repository's own Python code (transformers' flag); off unless "
                               "the config says so",
    "lora.r": "rank of the update B·A",
    "lora.lora_alpha": "the update is scaled by lora_alpha / r (lora_alpha / sqrt(r) with use_rslora)",
    "lora.lora_dropout": "dropout on the adapter's input (the base path is not dropped)",
    "lora.target_modules": "required: module names (matched exactly or as a `.`-suffix), a regex matched "
                           "against the full path, or all-linear",
    "lora.exclude_modules": "names or a regex of modules never adapted, even when target_modules matches them",
    "lora.layers_to_transform": "adapt only these layer indices",
    "lora.layers_pattern": "the name of the layer list that layers_to_transform indexes (e.g. layers, h)",
    "lora.bias": "which biases train: none, all, or lora_only (those of adapted layers)",
    "lora.modules_to_save": "modules trained in full and saved with the adapter (e.g. a classifier head)",
    "lora.use_rslora": "rank-stabilised scaling lora_alpha / sqrt(r)",
    "lora.use_dora": "DoRA: a learned magnitude per output row on top of the low-rank direction update",
    "lora.init_lora_weights": "true: A Kaiming-uniform, B zero; gaussian; pissa (A, B from the weight's top "
                              "singular directions); false: random B (for tests)",
    "lora.rank_pattern": "regex -> rank, overriding r for the modules it matches",
    "lora.alpha_pattern": "regex -> alpha, overriding lora_alpha for the modules it matches",
    "lora.task_type": "PEFT's task type written to adapter_config.json (set from model.task when absent)",
    "lora.base_model_name_or_path": "the base model recorded in adapter_config.json (set from model.name when "
                                    "absent)",
    "data.validation": "held-out records, a file or a built-in name like train; when absent, "
                       "validation_fraction of train is held out",
    "data.format": "how records become examples; when unset, a built-in dataset brings its own and a file's columns "
                   "decide (text+label, messages, prompt+completion, instruction+output, source+target, text)",
    "data.label_names": "the labels' names (classification); else taken from the data (built-in, or sorted "
                        "train labels)",
    "data.validation_fraction": "share of train held out for evaluation when validation is absent (seeded)",
    "data.max_train_records": "use at most this many training records",
    "data.max_eval_records": "evaluate on at most this many held-out records",
    "data.seed": "seed of the train/validation split and the record caps",
    "data.skip_bad_records": "skip (and count in the report) malformed records instead of stopping with an "
                             "error naming file, line and field",
    "data.max_length": "tokens per example; longer examples are truncated",
    "data.text_field": "record field holding the text (text and classification formats)",
    "data.label_field": "record field holding the label (classification)",
    "data.prompt_field": "record field holding the prompt (prompt_completion)",
    "data.completion_field": "record field holding the answer (prompt_completion)",
    "data.instruction_field": "record field holding the instruction (instruction format, alpaca style)",
    "data.input_field": "record field holding the optional input (instruction format)",
    "data.output_field": "record field holding the answer (instruction format)",
    "data.messages_field": "record field holding the chat turns (chat format)",
    "data.source_field": "record field holding the source sentence (translation)",
    "data.target_field": "record field holding the target sentence (translation)",
    "data.source_language": "source language named in the translation prompt",
    "data.target_language": "target language named in the translation prompt",
    "train.batch_size": "examples per micro-batch",
    "train.weight_decay": "AdamW's decoupled weight decay on the adapter",
    "train.warmup_steps": "steps of linear warmup from 0 to learning_rate",
    "train.schedule": "learning-rate schedule after warmup",
    "train.max_grad_norm": "clip the adapter's gradient norm to this (null: no clipping)",
    "train.eval_batch_size": "examples per evaluation batch",
    "train.checkpoint_every": "write a resumable checkpoint every N steps (0: only when stopped by a signal)",
    "train.keep_checkpoints": "checkpoints kept; older ones are deleted",
    "train.seed": "seed of the adapter's initialisation, dropout and batch order",
}

SECTION_INTRO = {
    "model": "The pretrained model and how its frozen weights are stored.",
    "lora": "The adapter. Field names and meanings are PEFT's, so `adapter_config.json` maps one to one.",
    "data": "Where records come from and how they become training examples.",
    "train": "The optimizer, schedule, batching, evaluation and checkpoints.",
}


def _comments(cls: type) -> dict[str, str]:
    """`name: type = value  # comment` lines of a class body: the comment is that key's meaning."""
    found: dict[str, str] = {}
    source = inspect.getsource(cls)
    lines = source.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            match = re.match(r"\s+(\w+)\s*:", lines[token.start[0] - 1])
            if match and token.start[1] > match.end():
                found[match.group(1)] = token.string.lstrip("# ").strip()
    return found


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(metadata: list[Any]) -> str:
    marks = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    parts = [f"{sign} {getattr(m, name)}" for m in metadata for name, sign in marks.items()
             if getattr(m, name, None) is not None]
    return f" ({', '.join(parts)})" if parts else ""


def _value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`" if str(value) else '`""`'


def _pydantic_row(key: str, field: Any, comment: str) -> dict[str, str]:
    if field.is_required():
        default = "required"
    elif field.default_factory is not None:
        default = _value(field.default_factory())
    else:
        default = _value(field.default)
    return {"key": key, "type": _type_name(field.annotation) + _bounds(field.metadata), "default": default,
            "given": field.description or "", "comment": comment}


def _pydantic_keys(prefix: str, model: type[BaseModel]) -> list[dict[str, str]]:
    comments = _comments(model)
    return [_pydantic_row(prefix + name, field, comments.get(name, "")) for name, field in model.model_fields.items()]


def _lora_keys() -> list[dict[str, str]]:
    hints = typing.get_type_hints(LoraConfig)
    rows = []
    for field in dataclasses.fields(LoraConfig):
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        rows.append({"key": f"lora.{field.name}", "type": _type_name(hints[field.name]),
                     "default": "required" if field.name == "target_modules" else _value(default), "given": "",
                     "comment": ""})
    return rows


def config_keys() -> list[dict[str, str]]:
    """Every YAML key a run accepts, in the order of the models, with type, default and meaning."""
    sections: dict[str, Any] = {"model": ModelSpec, "lora": LoraConfig, "data": DataConfig, "train": TrainSpec}
    rows = []
    for name, field in RunConfig.model_fields.items():
        model = sections.get(name)
        if model is LoraConfig:
            rows += _lora_keys()
        elif model is not None:
            rows += _pydantic_keys(f"{name}.", model)
        else:
            rows.append(_pydantic_row(name, field, ""))
    unknown = sorted(set(MEANINGS) - {row["key"] for row in rows})
    if unknown:
        raise ValueError(f"config_docs.MEANINGS names keys the config no longer has: {', '.join(unknown)}")
    for row in rows:
        given, comment = row.pop("given"), row.pop("comment")
        if given and row["key"] in MEANINGS:  # a description and an entry: two sources for one meaning
            raise ValueError(f"{row['key']}: meaning given both by the model and by config_docs.MEANINGS")
        row["meaning"] = given or MEANINGS.get(row["key"]) or comment
        if not row["meaning"]:
            raise ValueError(f"{row['key']}: no meaning; add a description to the field or an entry to "
                             "loratune/config_docs.py MEANINGS")
    return rows


def render() -> str:
    rows = config_keys()
    out = ["# Configuration keys", "",
           f"<!-- generated by `{REGENERATE}` (python -m loratune.config_docs) from the config models; "
           "do not edit -->", "",
           "A run is one YAML file with the sections below; `--set section.key=value` overrides any key from the "
           "command line (the value is read as YAML). The whole file is validated before a model loads: an "
           "unknown key or a bad value is a one-line error naming the key and the file.", "",
           f"{len(rows)} keys. `train.loss_chunk_tokens` defaults to {DEFAULT_LOSS_CHUNK} when null.", ""]
    top = [row for row in rows if "." not in row["key"]]
    for section in ("model", "lora", "data", "train"):
        mine = [row for row in rows if row["key"].startswith(section + ".")]
        out += [f"## {section} ({len(mine)} keys)", "", SECTION_INTRO[section], "", *_table(mine), ""]
    out += ["## top level", "", *_table(top)]
    return "\n".join(out) + "\n"


def _table(rows: list[dict[str, str]]) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for row in rows:
        cells = [f"`{row['key']}`", row["type"], row["default"], row["meaning"]]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    """`python -m loratune.config_docs [--check] [PATH]`: write the page, or exit 1 when it is stale."""
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    path = Path(next((a for a in args if a != "--check"), DOC_PATH))
    text = render()
    if check:
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            print(f"{path} is stale: run `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    write_text_atomic(path, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
