"""A record with its origin, and the policy for bad records (stop, or skip and count)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loratune.errors import DataError


@dataclass
class Record:
    """One raw record (a dict of fields) and where it came from, e.g. "train.jsonl, line 7"."""

    fields: dict[str, Any]
    where: str


def record_error(where: str, field_name: str | None, problem: str) -> DataError:
    """A one-line error naming the file and line (in `where`), the field and the problem."""
    if field_name is None:
        return DataError(f"{where}: {problem}")
    return DataError(f"{where}, field {field_name!r}: {problem}")


@dataclass
class BadRecords:
    """Raises on the first bad record, or (with `skip=True`) counts them and keeps a few messages."""

    skip: bool = False
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def report(self, error: DataError) -> None:
        if not self.skip:
            raise error
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(str(error))
