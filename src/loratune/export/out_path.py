"""Where an export may write: never over a file it reads, never over a file of another kind unless forced.

An export replaces its `--out` atomically, so a wrong `--out` used to destroy the adapter or base model it
was reading, or any file that happened to have that name. These checks run before anything loads.
"""

from __future__ import annotations

import os
from pathlib import Path

from loratune.core.errors import LoratuneError

GGUF_MAGIC = b"GGUF"


def check_out(out: Path, modelfile: Path | None, adapter_dir: str | os.PathLike, model: str, force: bool) -> None:
    """Refuse an `--out` (or its Modelfile) that is one of the inputs, or an existing file of another format."""
    inputs = _input_identities(adapter_dir, model)
    targets = [out] if modelfile is None else [out, modelfile]
    if modelfile is not None and out.name.lower() == modelfile.name.lower():
        raise LoratuneError(f"--out {out}: the GGUF file and its Modelfile would both be written to this name; "
                            "give the .gguf file to write")
    for target in targets:
        if _identity(target) in inputs:
            raise LoratuneError(f"--out {out}: {target} is one of the files this export reads (the adapter or "
                                "the base model); write somewhere else")
    if force:
        return
    for target, looks_right, kind in ((out, _is_gguf, "a GGUF file"), (modelfile, _is_modelfile, "a Modelfile")):
        if target is not None and target.is_file() and not looks_right(target):
            raise LoratuneError(f"--out {out}: {target} exists and is not {kind}; pass --force to replace it")


def check_folder_out(out: Path, adapter_dir: str | os.PathLike, model: str) -> None:
    """A merged folder is never written over (nor into the place of) the adapter or model folder it reads."""
    if out.exists() and _identity(out) in _input_identities(adapter_dir, model, files=False):
        raise LoratuneError(f"--out {out}: is the adapter or base model this export reads; write somewhere else")


def _input_identities(adapter_dir: str | os.PathLike, model: str, files: bool = True) -> set[tuple[int, int]]:
    """(device, inode) of the adapter and model paths (and, with `files`, of the files in their folders):
    symlinks and hard links resolve to the same identity."""
    from loratune.pretrained import builtin_models, builtin_path

    roots = [Path(adapter_dir), builtin_path(model) if model in builtin_models() else Path(model).expanduser()]
    found = set()
    for root in roots:
        inside = [p for p in root.iterdir() if p.is_file()] if files and root.is_dir() else []
        paths = [root, *inside]
        found.update(identity for path in paths if (identity := _identity(path)) is not None)
    return found


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == GGUF_MAGIC


def _is_modelfile(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(1 << 16).decode("utf-8", errors="replace")
    return any(line.lstrip().upper().startswith("FROM ") for line in head.splitlines())
