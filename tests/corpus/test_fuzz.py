"""Property-based tests of everything that reads a user's or a stranger's files: the config loader, the data
readers, the adapter-folder reader and the safetensors header check. Whatever the bytes, each either returns
or raises one of loratune's own errors (a `LoratuneError`, which the CLI prints as one line); none hangs
(a deadline per example), allocates what a header merely claims, or opens a file outside the given folder."""

from __future__ import annotations

import json
import struct
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from loratune.core.errors import LoratuneError
from loratune.core.lora_config import LoraConfig
from loratune.core.peft_format import load_adapter, read_adapter_config, read_adapter_weights
from loratune.data.readers import read_file
from loratune.data.records import BadRecords
from loratune.quant.streaming import read_header, read_tensors
from loratune.train.run_config import load_config

FUZZ = settings(max_examples=200, deadline=timedelta(seconds=5), database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64) | st.floats() | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)

_opened: list[str] | None = None
# lazy imports of Python modules, and the time-zone data pyarrow reads once
_LIBRARIES = (*{sys.prefix, sys.base_prefix, sys.exec_prefix}, "/usr/share/zoneinfo")


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, Path)):
        path = str(args[0])
        if not path.startswith(_LIBRARIES):
            _opened.append(path)


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one records only inside `opened_files`


@contextmanager
def opened_files():
    """The paths Python opens inside the block (the safetensors library's own reads are not seen here)."""
    global _opened
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


def only_loratune_errors(call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except LoratuneError as exc:
        assert "\n" not in str(exc).strip(), str(exc)
        return exc


# --- the config loader ------------------------------------------------------------------------------------
SECTIONS = {"model": ["name", "task", "dtype", "quantize", "loftq_iterations", "trust_remote_code"],
            "lora": ["r", "lora_alpha", "lora_dropout", "target_modules", "rank_pattern", "alpha_pattern",
                     "layers_to_transform", "bias", "init_lora_weights", "use_dora", "modules_to_save"],
            "data": ["train", "format", "validation_fraction", "max_length", "label_names", "prompt_template",
                     "completion_template"],
            "train": ["max_steps", "batch_size", "learning_rate", "precision", "schedule", "checkpoint_every"]}
config_like = st.fixed_dictionaries({}, optional={
    section: st.dictionaries(st.sampled_from(keys) | st.text(max_size=8), json_values, max_size=6)
    for section, keys in SECTIONS.items()} | {"output_dir": json_values})


@FUZZ
@given(text=st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_config_loader_on_any_text(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    only_loratune_errors(load_config, path)


@FUZZ
@given(data=config_like, overrides=st.lists(st.text(max_size=30), max_size=3))
def test_config_loader_on_config_shaped_yaml(tmp_path, data, overrides):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    only_loratune_errors(load_config, path, overrides)


# --- the data readers -------------------------------------------------------------------------------------
jsonl_lines = st.lists(json_values.map(json.dumps) | st.text(max_size=40), max_size=8).map("\n".join)
csv_text = st.lists(st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=8), max_size=4),
                    max_size=6).map(lambda rows: "\n".join(",".join(row) for row in rows))


@FUZZ
@given(suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".parquet"]), skip=st.booleans(),
       content=st.binary(max_size=400) | jsonl_lines.map(str.encode) | csv_text.map(str.encode)
       | st.lists(json_values, max_size=5).map(lambda v: json.dumps(v).encode()))
def test_data_readers_on_any_bytes(tmp_path, suffix, skip, content):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    with opened_files() as opened:
        result = only_loratune_errors(read_file, path, BadRecords(skip=skip))
    assert {Path(p).resolve() for p in opened} <= {path.resolve()}, (opened, path)
    if not isinstance(result, LoratuneError):
        assert all(isinstance(record.fields, dict) for record in result)


@FUZZ
@given(rows=st.lists(st.dictionaries(st.sampled_from(["text", "label", "x"]),
                                     st.none() | st.integers(-5, 5) | st.text(max_size=10), max_size=3),
                     min_size=1, max_size=6), cut=st.integers(0, 4096))
def test_parquet_reader_on_whole_and_cut_files(tmp_path, rows, cut):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    try:
        pq.write_table(pa.Table.from_pylist(rows), path)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed column types: not a table pyarrow can write
        return
    whole = path.read_bytes()
    path.write_bytes(whole[: max(0, len(whole) - cut)])
    only_loratune_errors(read_file, path, BadRecords())


# --- safetensors headers and the adapter folder ----------------------------------------------------------
DTYPES = ["F32", "F16", "BF16", "I64", "I8", "U8", "BOOL", "F8_E4M3", "X"]
sizes = st.integers(0, 6) | st.sampled_from([2**31, 2**60, 2**63 - 1, -1])
entries = st.fixed_dictionaries({"dtype": st.sampled_from(DTYPES), "shape": st.lists(sizes, max_size=3),
                                 "data_offsets": st.lists(sizes, min_size=2, max_size=2)})
headers = st.dictionaries(st.sampled_from(["base_model.model.q.lora_A.weight", "base_model.model.q.lora_B.weight",
                                           "__metadata__", "x"]), entries | json_values, max_size=3)


@st.composite
def safetensors_blobs(draw) -> bytes:
    """Files shaped like safetensors: a length (true, or claiming up to 2**64 - 1 bytes), a JSON header with
    offsets and shapes that may lie, and a few data bytes; or plain random bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    header = json.dumps(draw(headers)).encode()
    claimed = draw(st.sampled_from([len(header)] * 3 + [0, 7, 2**31, 2**60, 2**64 - 1]))
    return struct.pack("<Q", claimed) + header + draw(st.binary(max_size=64))


def _true_safetensors(rank: int) -> bytes:
    from safetensors.torch import save

    return save({"base_model.model.q.lora_A.weight": torch.ones(rank, 4),
                 "base_model.model.q.lora_B.weight": torch.zeros(4, rank)})


@FUZZ
@given(blob=safetensors_blobs())
def test_safetensors_header_check_allocates_only_what_the_file_holds(tmp_path, blob):
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    result = only_loratune_errors(lambda: dict(read_tensors(path)))
    if not isinstance(result, LoratuneError):
        assert sum(t.numel() * t.element_size() for t in result.values()) <= len(blob)
        assert read_header(path)[0] <= len(blob)


adapter_configs = st.fixed_dictionaries(
    {"r": st.sampled_from([2, 4]) | json_values, "target_modules": st.sampled_from([["q"], ["v"], "q", "(q"])
     | json_values},
    optional={"lora_alpha": json_values, "peft_type": st.sampled_from(["LORA", "IA3"]), "bias": json_values,
              "rank_pattern": json_values, "use_dora": json_values, "modules_to_save": json_values,
              "layers_to_transform": json_values})
adapter_configs = st.tuples(adapter_configs, st.dictionaries(st.text(max_size=8), json_values, max_size=1)).map(
    lambda pair: {**pair[1], **pair[0]})


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.v = nn.Linear(4, 4), nn.Linear(4, 4)


@FUZZ
@given(config=adapter_configs.map(json.dumps) | st.text(max_size=80),
       weights=safetensors_blobs() | st.sampled_from([2, 4]).map(_true_safetensors) | st.none())
def test_adapter_folder_reader_stays_in_its_folder(tmp_path, config, weights):
    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(config, encoding="utf-8", errors="surrogateescape")
    weights_file = folder / "adapter_model.safetensors"
    weights_file.unlink(missing_ok=True)
    if weights is not None:
        weights_file.write_bytes(weights)
    model = _Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with opened_files() as opened:
        parsed = only_loratune_errors(read_adapter_config, folder)
        only_loratune_errors(read_adapter_weights, folder)
        loaded = only_loratune_errors(load_adapter, model, folder)
    assert all(Path(p).resolve().is_relative_to(folder.resolve()) for p in opened), opened
    if not isinstance(parsed, LoratuneError):
        assert isinstance(parsed, LoraConfig)
    if isinstance(loaded, LoratuneError):  # a refused adapter leaves the model exactly as it was
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("claimed", [2**60, 2**64 - 1])
def test_a_header_claiming_exabytes_is_refused_before_allocation(tmp_path, claimed):
    """Reading these lengths would need exabytes; the refusal has to come from comparing with the file."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", claimed) + b"{}")
    with pytest.raises(LoratuneError, match="header claims"):
        read_header(path)
    entry = {"x": {"dtype": "F32", "shape": [2**30, 2**28], "data_offsets": [0, 2**60]}}
    header = json.dumps(entry).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(LoratuneError, match="truncated inside tensor"):
        dict(read_tensors(path))
