"""Class labels: which names a dataset has, and turning a record's label (name or index) into an id."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from loratune.data.records import Record, record_error


def infer_label_names(records: Iterable[Record], field: str) -> list[str]:
    """Label names seen in the records: sorted strings, or "0".."n-1" when every label is an index.

    Values of the wrong type are ignored here; `LabelMap.to_id` reports them with their line.
    """
    values = [r.fields.get(field) for r in records]
    ints = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]
    strings = {v for v in values if isinstance(v, str) and v != ""}
    if ints and not strings:
        return [str(i) for i in range(max(ints) + 1)]
    return sorted(strings | {str(i) for i in ints})


class LabelMap:
    """Maps a record's label (a name, an index, or an index written as a string) to its id."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self._ids = {name: i for i, name in enumerate(self.names)}

    def to_id(self, value: Any, record: Record, field: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise record_error(record.where, field, f"expected a label name or index, got {type(value).__name__}")
        if isinstance(value, str) and value in self._ids:
            return self._ids[value]
        index = _as_index(value)
        if index is not None and 0 <= index < len(self.names):
            return index
        known = ", ".join(self.names) if len(self.names) <= 20 else f"{len(self.names)} names"
        raise record_error(record.where, field, f"unknown label {value!r} (known: {known})")

    def name(self, label_id: int) -> str:
        return self.names[label_id]


def _as_index(value: str | int) -> int | None:
    if isinstance(value, int):
        return value
    text = value.strip()
    return int(text) if text.isdigit() else None
