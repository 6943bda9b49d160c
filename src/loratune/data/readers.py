"""Read records from JSONL, JSON, CSV/TSV and Parquet files, or from a `datasets.Dataset`.

JSONL and CSV are read with the standard library so that every problem can name its line.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from loratune.data.records import BadRecords, Record, record_error
from loratune.errors import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def read_file(path: Path, bad: BadRecords) -> list[Record]:
    """All records of a data file; the suffix says how to read it."""
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return list(_read_jsonl(path, bad))
    if suffix == ".json":
        return _read_json(path, bad)
    if suffix in (".csv", ".tsv"):
        return list(read_delimited(path, _decode(path), "\t" if suffix == ".tsv" else ",", bad))
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"{path}: unknown data file type {suffix!r}; expected one of {', '.join(SUFFIXES)}")


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not valid UTF-8 (byte {exc.start})") from exc


def _read_jsonl(path: Path, bad: BadRecords) -> Iterator[Record]:
    for number, line in enumerate(_decode(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.report(record_error(where, None, f"invalid JSON ({exc.msg}, column {exc.colno})"))
            continue
        if not isinstance(value, dict):
            bad.report(record_error(where, None, f"expected a JSON object, got {type(value).__name__}"))
            continue
        yield Record(value, where)


def _read_json(path: Path, bad: BadRecords) -> list[Record]:
    try:
        value = json.loads(_decode(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}: invalid JSON ({exc.msg}, column {exc.colno})") from exc
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(value).__name__}")
    records = []
    for number, item in enumerate(value, start=1):
        where = f"{path}, record {number}"
        if isinstance(item, dict):
            records.append(Record(item, where))
        else:
            bad.report(record_error(where, None, f"expected a JSON object, got {type(item).__name__}"))
    return records


def read_delimited(origin: Path | str, text: str, delimiter: str, bad: BadRecords) -> Iterator[Record]:
    """Rows of a CSV/TSV text with a header row, as dicts; `where` names the row's first line."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = next(reader, None)
    if not header:
        raise DataError(f"{origin}, line 1: empty file, expected a header row")
    first_line = reader.line_num + 1
    for row in reader:
        where = f"{origin}, line {first_line}"
        first_line = reader.line_num + 1
        if not row:
            continue
        if len(row) != len(header):
            problem = f"has {len(row)} columns, the header has {len(header)}"
            bad.report(record_error(where, None, problem))
            continue
        yield Record(dict(zip(header, row)), where)


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises many types for a damaged file
        raise DataError(f"{path}: cannot read Parquet file: {str(exc).splitlines()[0]}") from exc
    return [Record(row, f"{path}, row {number}") for number, row in enumerate(rows, start=1)]


def records_from_rows(rows: Iterable[Any], name: str, bad: BadRecords) -> list[Record]:
    """Records from a `datasets.Dataset` or any iterable of dicts (rows numbered from 1)."""
    records = []
    for number, row in enumerate(rows, start=1):
        where = f"{name}, row {number}"
        if isinstance(row, dict):
            records.append(Record(dict(row), where))
        else:
            bad.report(record_error(where, None, f"expected a dict, got {type(row).__name__}"))
    return records
