"""Issue 27: an export never writes over what it reads, never silently over a file of another kind, never writes
its GGUF and Modelfile to one name, and clears the temporary files of an earlier export that was killed."""

import fcntl
import os
import shutil

import pytest
from export_tools import save_adapter, tiny_adapter, tiny_llama_dir  # noqa: F401 (fixtures)
from test_export_refusals import one_line_error

from loratune.cli import main
from loratune.export import export


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def inputs(tmp_path, tiny_llama_dir, tiny_adapter):
    """Copies of the base and adapter folders, which a bad --out could destroy."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(tiny_llama_dir, base)
    shutil.copytree(tiny_adapter, adapter)
    return base, adapter


@pytest.mark.parametrize("fmt, victim", [("gguf-lora", "adapter/adapter_model.safetensors"),
                                         ("gguf", "base/model.safetensors"), ("gguf", "adapter/adapter_config.json"),
                                         ("gguf-lora", "linked/adapter_model.safetensors"),
                                         ("gguf-lora", "hard.safetensors"), ("safetensors", "adapter"),
                                         ("safetensors", "linked")])
def test_out_is_never_one_of_the_inputs(inputs, tmp_path, capsys, fmt, victim):
    base, adapter = inputs
    (tmp_path / "linked").symlink_to(adapter)  # the adapter folder under another name
    os.link(adapter / "adapter_model.safetensors", tmp_path / "hard.safetensors")
    before = (snapshot(base), snapshot(adapter))
    argv = ["export", str(adapter), "--model", str(base), "--format", fmt, "--out", str(tmp_path / victim)]
    one_line_error(capsys, argv, "this export reads")
    one_line_error(capsys, [*argv, "--force"], "this export reads")  # --force never allows it
    assert (snapshot(base), snapshot(adapter)) == before


def test_an_existing_file_of_another_kind_is_replaced_only_with_force(inputs, tmp_path, capsys):
    base, adapter = inputs
    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes\n")
    argv = ["export", str(adapter), "--model", str(base), "--format", "gguf-lora", "--out", str(notes)]
    one_line_error(capsys, argv, f"{notes} exists and is not a GGUF file", "--force")
    assert notes.read_text() == "my notes\n" and not (tmp_path / "notes.Modelfile").exists()
    assert main([*argv, "--force"]) == 0 and notes.read_bytes()[:4] == b"GGUF"
    assert main(argv) == 0  # an earlier export (a GGUF and a Modelfile) is replaced without --force
    (tmp_path / "notes.Modelfile").write_text("nothing like a Modelfile\n")
    one_line_error(capsys, argv, "notes.Modelfile exists and is not a Modelfile")


@pytest.mark.parametrize("name", ["x.Modelfile", "x.modelfile"])
def test_the_gguf_and_its_modelfile_never_share_a_name(inputs, tmp_path, capsys, name):
    base, adapter = inputs
    argv = ["export", str(adapter), "--model", str(base), "--format", "gguf-lora", "--out", str(tmp_path / name)]
    one_line_error(capsys, argv, "would both be written to this name")
    assert not (tmp_path / name).exists()


def test_leftovers_of_a_killed_export_are_removed_by_the_next(inputs, tmp_path):
    base, adapter = inputs
    out = tmp_path / "out"
    out.mkdir()
    killed = [out / ".old.gguf.k2j3h4ab.tmp", out / ".old.Modelfile.zz9x8c7v.tmp", out / ".merged.q1w2e3r4.tmp"]
    for path in killed[:2]:
        path.write_bytes(b"GGUF half-written")
    killed[2].mkdir()
    (killed[2] / "model.safetensors").write_bytes(b"half")
    live = out / ".other.gguf.a1b2c3d4.tmp"  # an export still writing: it holds the lock
    live.write_bytes(b"GGUF in progress")
    unrelated = out / ".notes.txt.a1b2c3d4.tmp"  # not a name an export writes: not ours to remove
    unrelated.write_text("x")
    with open(live, "rb") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        export(adapter, str(base), "gguf-lora", out / "lora.gguf")
        export(adapter, str(base), "safetensors", out / "merged")
    assert not [p for p in killed if p.exists()]
    assert live.exists() and unrelated.exists()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["lora.Modelfile", "lora.gguf",
                                                                                   "merged"]
