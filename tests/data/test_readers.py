"""Reading records from files and dataset objects; problems name the file and line."""

import datasets
import pytest

from loratune.data import BadRecords
from loratune.data.readers import read_file, records_from_rows
from loratune.errors import DataError


def test_jsonl_records_know_their_line(write_jsonl):
    path = write_jsonl([{"text": "a"}, "\n", {"text": "b"}])
    records = read_file(path, BadRecords())
    assert [r.fields for r in records] == [{"text": "a"}, {"text": "b"}]
    assert records[1].where == f"{path}, line 3"


def test_bad_jsonl_line_is_an_error_naming_file_and_line(write_jsonl):
    path = write_jsonl([{"text": "a"}, '{"text": \n', "[1, 2]\n"])
    with pytest.raises(DataError, match=rf"^{path}, line 2: invalid JSON"):
        read_file(path, BadRecords())


def test_bad_lines_are_counted_when_skipping(write_jsonl):
    path = write_jsonl([{"text": "a"}, '{"text": \n', "[1, 2]\n", {"text": "b"}])
    bad = BadRecords(skip=True)
    assert [r.fields["text"] for r in read_file(path, bad)] == ["a", "b"]
    assert bad.count == 2
    assert bad.examples[1] == f"{path}, line 3: expected a JSON object, got list"


def test_json_list_of_objects(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"text": "a"},\n {"text": "b"}]')
    assert [r.where for r in read_file(path, BadRecords())] == [f"{path}, record 1", f"{path}, record 2"]
    path.write_text('{"text": "a"}')
    with pytest.raises(DataError, match="expected a JSON list of objects, got dict"):
        read_file(path, BadRecords())
    path.write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(DataError, match=rf"^{path}, line 2: invalid JSON"):
        read_file(path, BadRecords())


def test_csv_lines_count_multiline_fields(write_csv):
    path = write_csv(["text", "label"], [["one\ntwo", "a"], ["three", "b"], ["x"]])
    bad = BadRecords(skip=True)
    records = read_file(path, bad)
    assert [r.fields for r in records] == [{"text": "one\ntwo", "label": "a"}, {"text": "three", "label": "b"}]
    assert [r.where for r in records] == [f"{path}, line 2", f"{path}, line 4"]
    assert bad.examples == [f"{path}, line 5: has 1 columns, the header has 2"]


def test_tsv_and_parquet(write_csv, tmp_path):
    tsv = write_csv(["source", "target"], [["hello", "hola"]], name="d.tsv", delimiter="\t")
    assert read_file(tsv, BadRecords())[0].fields == {"source": "hello", "target": "hola"}
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"text": "a", "label": 1}, {"text": "b", "label": 0}]).to_parquet(parquet)
    records = read_file(parquet, BadRecords())
    assert records[1].fields == {"text": "b", "label": 0} and records[1].where == f"{parquet}, row 2"


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=rf"^{path}, line 2: not valid UTF-8"):
        read_file(path, BadRecords())


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        read_file(tmp_path / "nope.jsonl", BadRecords())
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(DataError, match="unknown data file type '.xml'"):
        read_file(tmp_path / "d.xml", BadRecords())


def test_dataset_rows():
    dataset = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    records = records_from_rows(dataset, "train dataset", BadRecords())
    assert records[1].fields == {"text": "b", "label": 1} and records[1].where == "train dataset, row 2"
