"""The converter yardstick of `make check-runtimes`: finding llama.cpp's converter in llama-cpp-python's sdist,
comparing two GGUF files tensor by tensor, and judging loratune's rows against the converter's."""

from __future__ import annotations

import io
import tarfile

import gguf
import numpy as np

from benchmarks.runtime_converter import compare_tensors, converter_failures, find_converter
from benchmarks.runtimes import failures

Q8 = gguf.GGMLQuantizationType.Q8_0


def write_gguf(path, name: str, tensors: dict) -> None:
    writer = gguf.GGUFWriter(path=None, arch="llama")
    writer.add_name(name)
    for tensor_name, (array, qtype) in tensors.items():
        writer.add_tensor(tensor_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_tensors_are_sorted_into_equal_different_other_type_and_one_side_only(tmp_path):
    rng = np.random.default_rng(0)
    weight, vector, matrix = (rng.standard_normal(shape).astype(np.float32) for shape in ((4, 64), (64,), (4, 32)))
    nudged = vector.copy()
    nudged[3] += 0.5
    write_gguf(tmp_path / "ours.gguf", "ours", {"w": (weight, Q8), "n": (vector, gguf.GGMLQuantizationType.F32),
                                                "e": (matrix, gguf.GGMLQuantizationType.F16),
                                                "x": (vector, gguf.GGMLQuantizationType.F32)})
    write_gguf(tmp_path / "theirs.gguf", "theirs", {"w": (weight, Q8), "n": (nudged, gguf.GGMLQuantizationType.F32),
                                                    "e": (matrix, gguf.GGMLQuantizationType.F32),
                                                    "y": (vector, gguf.GGMLQuantizationType.F32)})
    row = compare_tensors(tmp_path / "ours.gguf", tmp_path / "theirs.gguf")
    assert row["equal"] == 1
    assert [d["tensor"] for d in row["different"]] == ["n"]
    assert abs(row["different"][0]["max_abs_diff"] - 0.5) < 1e-6
    assert row["type_differs"] == [{"tensor": "e", "loratune": "F16", "converter": "F32"}]
    assert (row["only_loratune"], row["only_converter"]) == (["x"], ["y"])
    assert row["metadata_differs"] == ["general.name"]


def add_file(tar: tarfile.TarFile, name: str, text: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(text.encode())
    tar.addfile(info, io.BytesIO(text.encode()))


def test_the_converter_is_unpacked_from_the_sdist_without_the_rest_of_llama_cpp(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    root = "llama_cpp_python-0.3.36/vendor/llama.cpp"
    with tarfile.open(source / "llama_cpp_python-0.3.36.tar.gz", "w:gz") as tar:
        for name in ("convert_hf_to_gguf.py", "conversion/base.py", "gguf-py/gguf/__init__.py", "ggml/src/ggml.c",
                     "convert_lora_to_gguf.py"):
            add_file(tar, f"{root}/{name}", "# " + name)
        add_file(tar, "llama_cpp_python-0.3.36/CMakeLists.txt")
    converter = find_converter(source, tmp_path / "work")
    assert converter is not None and converter.read_text() == "# convert_hf_to_gguf.py"
    tree = converter.parent
    assert (tree / "conversion/base.py").is_file() and (tree / "gguf-py/gguf/__init__.py").is_file()
    assert not (tree / "ggml").exists() and not (tree / "convert_lora_to_gguf.py").exists()
    assert find_converter(tree.parents[2], tmp_path / "again") == converter  # an unpacked sdist is used in place
    assert find_converter(tmp_path / "missing", tmp_path / "work2") is None


def agreement(free: float, fed: float) -> dict:
    return {"token_agreement": free, "forced_token_agreement": fed, "max_abs_logit_diff": 1.0}


def tensors(different: int = 0) -> dict:
    return {"equal": 10, "different": [{"tensor": f"blk.{i}.attn_q.weight", "type": "Q8_0", "max_abs_diff": 1e-2}
                                       for i in range(different)], "type_differs": [], "only_loratune": [],
            "only_converter": [], "metadata_differs": []}


def smollm2(merged_q8: dict, converter_q8: dict, q8_tensors: dict, lora_q8: dict | None = None) -> dict:
    return {"merged f32": agreement(1.0, 1.0) | {"max_abs_logit_diff": 1e-4},
            "base+lora f32": agreement(1.0, 1.0) | {"max_abs_logit_diff": 1e-4},
            "merged f16": agreement(0.97, 0.99), "base+lora f16": agreement(1.0, 1.0),
            "merged q8_0": merged_q8, "base+lora q8_0": lora_q8 or agreement(0.99, 1.0),
            "converter": {"converter": "convert_hf_to_gguf.py", "f16": agreement(0.97, 0.99) | {"tensors": tensors()},
                          "q8_0": converter_q8 | {"tensors": q8_tensors}}}


def test_a_merged_file_within_a_point_of_the_converter_passes_below_95_free_running():
    results = {"smollm2": smollm2(agreement(0.62, 0.965), agreement(0.625, 0.968), tensors())}
    assert converter_failures("smollm2", results["smollm2"]) == []
    assert failures(results) == []


def test_more_than_a_point_behind_the_converter_or_a_differing_tensor_fails():
    behind = smollm2(agreement(0.60, 0.965), agreement(0.62, 0.968), tensors(different=2))
    problems = converter_failures("smollm2", behind)
    assert len(problems) == 2
    assert "free-running agreement 60.00%, the converter's 62.00%" in problems[0]
    assert "2 tensors differ" in problems[1] and "blk.0.attn_q.weight" in problems[1]


def test_fed_below_95_fails_every_low_precision_row_and_a_lora_needs_95_free_running():
    results = {"smollm2": smollm2(agreement(0.62, 0.94), agreement(0.62, 0.94), tensors(),
                                  lora_q8=agreement(0.90, 0.99))}
    problems = failures(results)
    assert any(p.startswith("smollm2 merged q8_0: 94.00%") for p in problems)
    assert any(p.startswith("smollm2 converter q8_0: 94.00%") for p in problems)
    assert any(p.startswith("smollm2 base+lora q8_0: 90.00% of free-running") for p in problems)
    assert len(problems) == 3
