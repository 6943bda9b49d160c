"""Atomic writes: a file or a folder appears complete under its name, or not at all.

Everything loratune writes for a user (adapter files, checkpoints, the GGUF cache, a merged model, the run's
reports) goes through these two context managers: the block writes to a temporary path beside the target,
which is renamed onto the target only if the block succeeds. A write that fails for a reason of the file
system (disk full, no permission) raises `WriteError` naming the target path and the cause, not the
temporary name; the temporary path is removed either way.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from loratune.core.errors import WriteError

# temporary names: "." + target name + "." + random + ".tmp"; `remove_leftovers` deletes those of killed writers.
# A writer holds an OS lock (flock) on its temporary path while it writes, so a live write is never taken for one.
TEMPORARY_SUFFIX = ".tmp"


def _ordinary_permissions(path: str | os.PathLike, mode: int) -> None:
    """mkstemp and mkdtemp make private paths; the result should have the permissions of an ordinary one."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    with _naming_failures(path, None):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with _naming_failures(path, Path(tmp)):
            yield Path(tmp)
            _ordinary_permissions(tmp, 0o666)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_folder(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; rename it onto `path` only if the block succeeds.

    An empty folder already at `path` is replaced; a non-empty one only with `replace`, else the rename
    raises `WriteError`, an `OSError` (a caller racing another writer can then use the other's result). Temporary names
    start with '.', so a reader listing the parent can skip unfinished folders.
    """
    path = Path(path)
    with _naming_failures(path, None):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent))
        fd = os.open(tmp, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with _naming_failures(path, tmp):
            yield tmp
            _ordinary_permissions(tmp, 0o777)
            if path.is_dir() and (replace or not any(path.iterdir())):
                shutil.rmtree(path)
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


def is_temporary(path: Path) -> bool:
    """A name `atomic_path` or `atomic_folder` writes to before the rename."""
    return path.name.startswith(".") and path.name.endswith(TEMPORARY_SUFFIX)


def remove_leftovers(folder: str | os.PathLike, endings: tuple[str, ...] | None = None) -> list[Path]:
    """Delete the temporary files and folders that killed writes left in `folder` (when `endings` is given,
    only those for target names ending so, in a folder loratune does not own); a write still in progress
    holds its lock and is left alone. Returns what was removed."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        if not is_temporary(path) or (endings is not None and not _target_name(path).endswith(endings)):
            continue
        if _unlocked(path):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _target_name(path: Path) -> str:
    """'.x.gguf.k2j3h4ab.tmp' -> 'x.gguf'."""
    return path.name[1:].rsplit(".", 2)[0]


def _unlocked(path: Path) -> bool:
    """True when no live writer holds the lock on `path` (its writer was killed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return path.is_symlink()  # a link is never a temporary of ours: stale; anything else unreadable: leave
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@contextmanager
def _naming_failures(target: Path, tmp: Path | None) -> Iterator[None]:
    """Turn a file-system failure inside a write into `WriteError` naming the target (not the temporary
    path) and the cause; a failure inside a folder being written names the file within the target folder.
    Serializers written in Rust (safetensors) report I/O errors in their own type."""
    try:
        yield
    except OSError as exc:  # WriteError too: a nested write names its file under our temporary path
        raise _write_error(target, tmp, exc.filename, exc.strerror or str(exc), exc.errno) from exc
    except SafetensorError as exc:
        cause = _io_cause(str(exc))
        if cause is None:
            raise
        raise _write_error(target, tmp, None, cause, None) from exc


def _write_error(target: Path, tmp: Path | None, filename: str | None, cause: str, errno: int | None) -> WriteError:
    where = target
    if filename and tmp is not None and Path(filename).is_relative_to(tmp) and Path(filename) != tmp:
        where = target / Path(filename).relative_to(tmp)
    error = WriteError(f"cannot write {where}: {cause}")
    error.errno, error.strerror, error.filename = errno, cause, str(where)
    return error


def _io_cause(message: str) -> str | None:
    """'Error while serializing: I/O error: No space left on device (os error 28)' -> 'No space left on device'."""
    marker = "I/O error: "
    if marker not in message:
        return None
    cause = message.split(marker, 1)[1].strip()
    return cause.rsplit(" (os error", 1)[0] if cause.endswith(")") else cause
