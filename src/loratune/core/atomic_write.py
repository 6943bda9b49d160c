"""Atomic writes: a file or a folder appears complete under its name, or not at all.

Everything loratune writes for a user (adapter files, checkpoints, the GGUF cache, a merged model, the run's
reports) goes through these two context managers: the block writes to a temporary path beside the target,
which is renamed onto the target only if the block succeeds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _ordinary_permissions(path: str | os.PathLike, mode: int) -> None:
    """mkstemp and mkdtemp make private paths; the result should have the permissions of an ordinary one."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _ordinary_permissions(tmp, 0o666)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_folder(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; rename it onto `path` only if the block succeeds.

    An empty folder already at `path` is replaced; a non-empty one only with `replace`, else the rename
    raises `OSError` (a caller racing another writer can then use the other's result). Temporary names
    start with '.', so a reader listing the parent can skip unfinished folders.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _ordinary_permissions(tmp, 0o777)
        if path.is_dir() and (replace or not any(path.iterdir())):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
