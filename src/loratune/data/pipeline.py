"""`load_datasets`: read records, split off validation, and format both splits into examples."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratune.core.errors import ConfigError
from loratune.data.builtin import builtin_spec, is_builtin, read_builtin
from loratune.data.data_config import DataConfig
from loratune.data.formatting import Formatter, check_task_format
from loratune.data.labels import LabelMap, infer_label_names
from loratune.data.readers import read_file, records_from_rows
from loratune.data.records import BadRecords, Record
from loratune.errors import DataError


@dataclass
class DataSplit(Sequence):
    """The examples of one split (it is a sequence of them), with the records they came from.

    For every format but concatenated `text`, `examples[i]` comes from `records[i]`; generative formats also
    carry `prompts[i]` (token ids to generate from) and `references[i]` (the expected answer).
    """

    records: list[Record] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    skipped: int = 0
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: Any) -> Any:
        return self.examples[index]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.examples)


@dataclass
class LoadedData:
    """Both splits plus what a report needs; unpacks as `(train_examples, eval_examples, info)`."""

    train: DataSplit
    eval: DataSplit
    label_names: list[str] | None
    info: dict[str, Any]
    label_answers: list[list[int]] | None = None  # each label's answer tokens, when answers are labels alone

    @property
    def train_examples(self) -> DataSplit:
        return self.train

    @property
    def eval_examples(self) -> DataSplit:
        return self.eval

    @property
    def eval_prompts(self) -> list[list[int]]:
        return self.eval.prompts

    @property
    def eval_references(self) -> list[str]:
        return self.eval.references

    def __iter__(self) -> Iterator[Any]:
        return iter((self.train, self.eval, self.info))


def load_datasets(
    cfg: DataConfig,
    tokenizer: Any,
    task: str,
    *,
    train_source: Any = None,
    validation_source: Any = None,
) -> LoadedData:
    """Read, split, cap and format the data of a run.

    `train_source`/`validation_source` (a `datasets.Dataset` or a list of dicts) replace
    `cfg.train`/`cfg.validation` when given.
    """
    if cfg.format is not None:  # a format that cannot fit the task fails before any file is read
        check_task_format(task, cfg.format)
    rng = random.Random(cfg.seed)
    bad_train, bad_eval = BadRecords(cfg.skip_bad_records), BadRecords(cfg.skip_bad_records)
    train = _read(train_source, cfg.train, "train", bad_train)
    fmt, columns = resolve_format(cfg, train, _name(train_source, cfg.train, "train"))
    check_task_format(task, fmt)
    if columns is not None:
        print(f"loratune: data.format: {fmt} (from the columns {', '.join(columns)})", file=sys.stderr)
    label_names = _label_names(cfg, fmt, train)  # before splitting, so a rare class is not lost
    if validation_source is not None or cfg.validation is not None:
        held_out = _read(validation_source, cfg.validation, "validation", bad_eval)
    else:
        train, held_out = split_records(train, cfg.validation_fraction, rng)
    train, held_out = _cap(train, cfg.max_train_records, rng), _cap(held_out, cfg.max_eval_records, rng)

    labels = LabelMap(label_names) if label_names is not None else None
    formatter = Formatter(cfg, tokenizer, task, fmt, labels)
    train_split = format_records(train, formatter, bad_train)
    eval_split = format_records(held_out, formatter, bad_eval)
    if fmt == "text" and cfg.concatenate_texts:
        train_split.examples = concatenate_texts(train_split.examples, cfg.max_length)
        eval_split.examples = concatenate_texts(eval_split.examples, cfg.max_length)
    if not train_split.examples:
        raise DataError(f"{_name(train_source, cfg.train, 'train')}: no usable training records")
    info = _info(cfg, fmt, task, train_split, eval_split, label_names, bad_train, bad_eval)
    answers = [formatter.label_answer_ids(name) for name in label_names or []]
    label_answers = answers if answers and all(answers) and len(set(map(tuple, answers))) == len(answers) else None
    return LoadedData(train_split, eval_split, label_names, info, label_answers)


def read_label_names(cfg: DataConfig) -> list[str] | None:
    """Label names of a classification dataset, known before any tokenizer or model is loaded.

    A classifier's head size depends on them, so the model can only be built after this.
    """
    if cfg.format not in (None, "classification"):
        return None
    if cfg.format is not None and cfg.label_names is not None:
        return list(cfg.label_names)
    train = _read(None, cfg.train, "train", BadRecords(cfg.skip_bad_records))
    fmt, _ = resolve_format(cfg, train, _name(None, cfg.train, "train"))
    return _label_names(cfg, fmt, train)


def check_sources(cfg: DataConfig, task: str) -> None:
    """Read a run's records without a tokenizer, so that a missing or malformed file, a format that does not
    fit the task, or too few labels is found before any model loads (formatting errors come later)."""
    if cfg.format is not None:
        check_task_format(task, cfg.format)
    train = _read(None, cfg.train, "train", BadRecords(cfg.skip_bad_records))
    fmt, _ = resolve_format(cfg, train, _name(None, cfg.train, "train"))
    check_task_format(task, fmt)
    _label_names(cfg, fmt, train)
    if cfg.validation is not None:
        _read(None, cfg.validation, "validation", BadRecords(cfg.skip_bad_records))


def resolve_format(cfg: DataConfig, records: list[Record], source: str) -> tuple[str, list[str] | None]:
    """The data format: `data.format`, a built-in dataset's own, or else the one the records' columns
    name; the columns are returned when they decided, so the run can say so."""
    if cfg.format is not None:
        return cfg.format, None
    if cfg.train is not None and is_builtin(cfg.train):
        return builtin_spec(cfg.train).format, None
    if not records:
        raise DataError(f"{source}: no records")
    present = list(dict.fromkeys(name for record in records for name in record.fields))
    columns = set(present)
    shapes = {
        "chat": (cfg.messages_field,),
        "prompt_completion": (cfg.prompt_field, cfg.completion_field),
        "instruction": (cfg.instruction_field, cfg.output_field),
        "translation": (cfg.source_field, cfg.target_field),
        "classification": (cfg.text_field, cfg.label_field),
    }
    matches = [fmt for fmt, needed in shapes.items() if columns.issuperset(needed)]
    if not matches and cfg.text_field in columns:
        matches = ["text"]
    if len(matches) != 1:
        found = ", ".join(present) or "none"
        raise ConfigError(f"{source}: data.format: not set, and the columns ({found}) do not say which; set it to "
                          "text, prompt_completion, instruction, chat, classification or translation")
    needed = shapes.get(matches[0], (cfg.text_field,))
    return matches[0], list(needed)


def _name(source: Any, spec: str | None, role: str) -> str:
    return spec if source is None and spec is not None else f"{role} dataset"


def _read(source: Any, spec: str | None, role: str, bad: BadRecords) -> list[Record]:
    """Records from a dataset object, a built-in name or a file path."""
    if source is not None:
        return records_from_rows(source, f"{role} dataset", bad)
    if spec is None:
        raise ConfigError(f"data.{role}: missing; give a data file or a built-in dataset name")
    if is_builtin(spec):
        return read_builtin(spec, bad)
    return read_file(Path(spec).expanduser(), bad)


def split_records(records: list[Record], fraction: float, rng: random.Random) -> tuple[list[Record], list[Record]]:
    """Hold out a seeded random `fraction` (at least one record when there are two or more); both parts
    keep file order."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    count = min(len(records) - 1, max(1, round(fraction * len(records))))
    held = set(rng.sample(range(len(records)), count))
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def _cap(records: list[Record], limit: int | None, rng: random.Random) -> list[Record]:
    """A seeded random subset of `limit` records, in file order, so a cap does not just take the head."""
    if limit is None or len(records) <= limit:
        return records
    keep = sorted(rng.sample(range(len(records)), limit))
    return [records[i] for i in keep]


def _label_names(cfg: DataConfig, fmt: str, train: list[Record]) -> list[str] | None:
    if fmt != "classification":
        return None
    if cfg.label_names is not None:
        return list(cfg.label_names)
    if cfg.train is not None and is_builtin(cfg.train) and builtin_spec(cfg.train).label_names:
        return list(builtin_spec(cfg.train).label_names or ())
    source = cfg.train or "train dataset"
    if not train:
        raise DataError(f"{source}: no records")
    names = infer_label_names(train, cfg.label_field)
    if not names:
        raise DataError(f"{source}, field {cfg.label_field!r}: no record has a usable label (missing, empty or "
                        "not a name)")
    if len(names) < 2:
        raise DataError(f"{source}, field {cfg.label_field!r}: found {len(names)} distinct "
                        f"label(s) {names}; classification needs at least 2 (or set data.label_names)")
    return names


def format_records(records: list[Record], formatter: Formatter, bad: BadRecords) -> DataSplit:
    """Format every record; a bad one raises, or is counted and left out when skipping."""
    split = DataSplit()
    for record in records:
        try:
            formatted = formatter(record)
        except DataError as error:
            bad.report(error)
            continue
        split.records.append(record)
        split.examples.append(formatted.example)
        split.truncated += formatted.truncated
        if formatted.prompt_ids is not None and formatted.reference is not None:
            split.prompts.append(formatted.prompt_ids)
            split.references.append(formatted.reference)
    split.skipped = bad.count
    return split


def concatenate_texts(examples: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Concatenate documents (each already ends in EOS) and cut the stream into `max_length` blocks;
    the last block may be shorter."""
    stream = [token for example in examples for token in example["input_ids"]]
    blocks = [stream[i : i + max_length] for i in range(0, len(stream), max_length)]
    return [{"input_ids": block, "labels": list(block)} for block in blocks]


def _info(
    cfg: DataConfig, fmt: str, task: str, train: DataSplit, held_out: DataSplit,
    label_names: list[str] | None, bad_train: BadRecords, bad_eval: BadRecords,
) -> dict[str, Any]:
    """Counts and settings for the run report (plain JSON types)."""
    return {
        "format": fmt,
        "task": task,
        "validation": cfg.validation or f"{cfg.validation_fraction:g} of train (seed {cfg.seed})",
        "train_records": len(train.records),
        "eval_records": len(held_out.records),
        "train_examples": len(train.examples),
        "eval_examples": len(held_out.examples),
        "skipped_records": bad_train.count + bad_eval.count,
        "skipped_examples": bad_train.examples + bad_eval.examples,
        "truncated_examples": train.truncated + held_out.truncated,
        "label_names": label_names,
        "max_length": cfg.max_length,
        "concatenate_texts": fmt == "text" and cfg.concatenate_texts,
    }
