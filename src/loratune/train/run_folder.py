"""The output folder belongs to one run at a time, and a fresh run never writes beside another's files.

`claim_output_dir` takes an exclusive lock on the folder (`.loratune.lock`, holding the owner's pid for
messages), refuses a fresh run into a folder that already holds anything, and removes what killed writes
left behind (`.<name>.<random>.tmp` files and folders of `core.atomic_write`) once the lock is held.
The lock is an OS file lock (`flock`), so it dies with its process: a lock file whose process is gone is
taken over with a warning, never trusted.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loratune.core.atomic_write import is_temporary
from loratune.core.atomic_write import remove_leftovers as remove_temporaries
from loratune.core.errors import LoratuneError

LOCK_NAME = ".loratune.lock"
# the folders a run writes atomically into, where a killed write can leave a temporary name behind
_WRITTEN_FOLDERS = (".", "checkpoints", "adapter")


class OutputDirBusy(LoratuneError):
    """Another process is running into the same output folder."""


@contextmanager
def claim_output_dir(out: Path, resume: bool) -> Iterator[Path]:
    """Hold `out` for one run: lock it, check that a fresh run starts empty, clear leftovers of killed writes.

    The lock is released (and its file removed) when the block ends, however it ends; a folder this call
    created is removed again if the run wrote nothing into it.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LoratuneError(f"output_dir {out} exists and is not a folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LoratuneError(f"output_dir {out}: cannot create it ({exc.strerror or exc})") from None
    fd = None
    try:
        fd = _lock(out)
        if not resume:
            _check_fresh(out)
        remove_leftovers(out)
        yield out
    finally:
        if fd is not None:
            _unlock(out, fd)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def remove_leftovers(out: Path) -> list[Path]:
    """Delete temporary files and folders of writes that were killed before their rename; returns them."""
    return [path for name in _WRITTEN_FOLDERS for path in remove_temporaries(out / name)]


def _is_leftover(path: Path) -> bool:
    return is_temporary(path) and path.name != LOCK_NAME


def _check_fresh(out: Path) -> None:
    """A fresh run never mixes with files it did not write: an earlier run's, or the user's own."""
    found = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME and not _is_leftover(p))
    if not found:
        return
    if "checkpoints" in found and any((out / "checkpoints").iterdir()):
        raise LoratuneError(f"output_dir {out} holds checkpoints of an earlier run; use --resume to continue it, "
                            "or choose another output_dir")
    shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    raise LoratuneError(f"output_dir {out} is not empty ({shown}); a new run needs an empty or new folder, "
                        "so choose another output_dir")


def _lock(out: Path) -> int:
    """Take the folder's lock, or refuse naming the process that holds it. Returns the lock file's descriptor."""
    path = out / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise OutputDirBusy(f"output_dir {out} is in use by another loratune run ({_describe(_owner(path))}); "
                                "wait for it to finish or choose another output_dir") from None
        if _same_file(path, fd):  # not a file its last owner unlinked while we waited to lock it
            break
        os.close(fd)
    previous = _owner(path)
    if previous.get("pid") not in (None, os.getpid()):
        print(f"loratune: warning: output_dir {out}: taking over the lock of {_describe(previous)}, "
              "which is no longer running", file=sys.stderr)
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n"
    # written in place, not renamed: the lock belongs to this file's inode
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)
    return fd


def _unlock(out: Path, fd: int) -> None:
    try:
        os.unlink(out / LOCK_NAME)  # while still locked, so no one else holds a lock on an unlinked file
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _owner(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(owner: dict) -> str:
    if "pid" not in owner:
        return "process unknown"
    where = f" on {owner['host']}" if owner.get("host") and owner["host"] != socket.gethostname() else ""
    since = f", started {owner['started']}" if owner.get("started") else ""
    return f"process {owner['pid']}{where}{since}"
