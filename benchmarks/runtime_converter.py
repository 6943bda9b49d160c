"""llama.cpp's own converter as the yardstick for loratune's merged GGUF export.

Part of `make check-runtimes` (benchmarks/runtimes.py calls `check_converter`). The llama.cpp source that
llama-cpp-python's pinned source distribution vendors holds `convert_hf_to_gguf.py` with its `conversion/` and
`gguf-py/`; `make check-runtimes` keeps that sdist under build/llama-cpp-source, so nothing else is fetched. The
adapter is merged into a safetensors folder (f32), the converter writes it as f16 and q8_0, llama.cpp runs those
files on the same prompts as loratune's own GGUF, and the two files' tensors are compared byte for byte.
loratune's file must agree at least as well as the converter's (within 1 point, free-running and fed) and equal
it byte for byte in every tensor both wrote in the same type.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

DEFAULT_SOURCE = Path("build/llama-cpp-source")
VENDORED = "vendor/llama.cpp"
#: what the converter needs from the vendored llama.cpp tree
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
DTYPES = ("f16", "q8_0")
#: loratune may trail the converter by at most this fraction of tokens (free-running and fed)
MAX_SHORTFALL = 0.01


def find_converter(source: Path, work: Path) -> Path | None:
    """`convert_hf_to_gguf.py` from llama-cpp-python's sdist: `source` is the .tar.gz, a folder holding it, or
    the sdist already unpacked. None when none is there."""
    if source.is_dir():
        unpacked = [p for p in (source / VENDORED, *source.glob(f"*/{VENDORED}")) if (p / CONVERTER_PARTS[0]).is_file()]
        if unpacked:
            return unpacked[0] / CONVERTER_PARTS[0]
        archives = sorted(source.glob("llama_cpp_python-*.tar.gz"))
    else:
        archives = [source] if source.is_file() else []
    return unpack_converter(archives[-1], work / "llama-cpp-source") if archives else None


def unpack_converter(archive: Path, dest: Path) -> Path | None:
    """Unpack only the converter's parts of the vendored llama.cpp tree (the sdist is 76 MB)."""
    with tarfile.open(archive) as tar:
        wanted = []
        for member in tar.getmembers():
            parts = member.name.split("/", 1)
            inside = parts[1] if len(parts) == 2 else ""
            if inside.startswith(VENDORED + "/") and \
                    inside[len(VENDORED) + 1:].startswith(CONVERTER_PARTS):
                wanted.append(member)
        tar.extractall(dest, members=wanted, filter="data")
    found = sorted(dest.glob(f"*/{VENDORED}/{CONVERTER_PARTS[0]}"))
    return found[0] if found else None


def convert(converter: Path, merged: Path, dtype: str, out: Path) -> Path:
    """Run the converter as its users do (its own `gguf-py`, not the installed `gguf`)."""
    env = {key: value for key, value in os.environ.items() if key != "NO_LOCAL_GGUF"}
    result = subprocess.run([sys.executable, str(converter), str(merged), "--outtype", dtype, "--outfile", str(out)],
                            capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"{converter.name} --outtype {dtype} failed (exit {result.returncode}): {last}")
    return out


def compare_tensors(ours: Path, theirs: Path) -> dict:
    """Tensor by tensor: equal bytes, different bytes (with the largest |difference| of their values), different
    types, present in one file only; and the metadata keys whose values differ."""
    mine = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    other_reader = gguf.GGUFReader(theirs)
    other = {t.name: t for t in other_reader.tensors}
    row: dict = {"equal": 0, "different": [], "type_differs": [],
                 "only_loratune": sorted(set(mine) - set(other)), "only_converter": sorted(set(other) - set(mine))}
    for name in sorted(set(mine) & set(other)):
        a, b = mine[name], other[name]
        if a.tensor_type != b.tensor_type:
            row["type_differs"].append({"tensor": name, "loratune": a.tensor_type.name,
                                        "converter": b.tensor_type.name})
        elif a.data.tobytes() == b.data.tobytes():
            row["equal"] += 1
        else:
            diff = np.abs(gguf.quants.dequantize(a.data, a.tensor_type) - gguf.quants.dequantize(b.data, b.tensor_type))
            row["different"].append({"tensor": name, "type": a.tensor_type.name, "max_abs_diff": float(diff.max())})
    row["metadata_differs"] = metadata_differences(gguf.GGUFReader(ours), other_reader)
    return row


def metadata_differences(ours: gguf.GGUFReader, theirs: gguf.GGUFReader) -> list[str]:
    """Keys written by one side only or with other values (the header's key count left out)."""
    keys = (set(ours.fields) | set(theirs.fields)) - {"GGUF.kv_count"}
    return sorted(key for key in keys if key not in ours.fields or key not in theirs.fields
                  or ours.fields[key].contents() != theirs.fields[key].contents())


def check_converter(source: Path, adapter: Path, model_name: str, ours: Callable[[str], Path], work: Path,
                    run: Callable[[str, Path], dict]) -> dict:
    """The converter's rows: `ours(dtype)` is loratune's merged GGUF of that dtype, `run(dtype, path)` llama.cpp's
    agreement row for a GGUF file. Without the sdist, one line and no rows."""
    from loratune.export import export

    converter = find_converter(source, work)
    if converter is None:
        message = (f"converter check skipped: no llama-cpp-python source distribution at {source} "
                   "(`make check-runtimes` downloads it there)")
        print(message, flush=True)
        return {"skipped": message}
    merged = work / "merged-for-converter"
    export(adapter, model_name, "safetensors", merged, "f32")
    rows: dict = {"converter": str(converter)}
    for dtype in DTYPES:
        path = convert(converter, merged, dtype, work / f"converter-{dtype}.gguf")
        tensors = compare_tensors(ours(dtype), path)
        rows[dtype] = run(dtype, path) | {"tensors": tensors}
        print(f"converter {dtype:5s} tensors against loratune's: {tensors['equal']} byte-equal, "
              f"{len(tensors['different'])} different, {len(tensors['type_differs'])} of another type, "
              f"{len(tensors['only_loratune'])} only in loratune's, {len(tensors['only_converter'])} only in the "
              f"converter's; metadata keys that differ: {', '.join(tensors['metadata_differs']) or 'none'}",
              flush=True)
    return rows


def converter_failures(label: str, results: dict) -> list[str]:
    """loratune's merged rows against the converter's: at most one point behind, and equal bytes wherever both
    chose the same tensor type."""
    rows = results.get("converter", {})
    problems = []
    for dtype in DTYPES:
        if dtype not in rows:
            continue
        theirs, mine = rows[dtype], results[f"merged {dtype}"]
        for key, what in (("token_agreement", "free-running"), ("forced_token_agreement", "fed")):
            if mine[key] < theirs[key] - MAX_SHORTFALL:
                problems.append(f"{label} merged {dtype}: {what} agreement {mine[key]:.2%}, the converter's "
                                f"{theirs[key]:.2%} (more than 1 point better)")
        different = [t["tensor"] for t in rows[dtype]["tensors"]["different"]]
        if different:
            problems.append(f"{label} merged {dtype}: {len(different)} tensors differ from the converter's in the "
                            f"same type ({', '.join(different[:5])}{', ...' if len(different) > 5 else ''})")
    return problems
