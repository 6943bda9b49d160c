"""Which adapters the server holds, and the checks that keep clients to safe names and to the adapter root.

A client names a folder relative to `--adapter-root` (or an absolute path inside it). The folder and its
two files must resolve, symlinks followed, to places inside the root, and the weights must be safetensors.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..core.errors import AdapterFileError, AdapterNameError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterLimitError(AdapterNameError):
    """The server already holds as many adapters as it allows."""


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise AdapterNameError(f"adapter name {name!r}: use 1-64 letters, digits, '-' or '_', starting with a letter "
                               "or digit")
    return name


def resolve_under_root(root: Path, folder: str) -> Path:
    """The real path of `folder` (relative to `root`, or absolute inside it), refusing anything that leads out."""
    if not isinstance(folder, str) or not folder or "\x00" in folder:
        raise AdapterFileError(f"adapter path {folder!r}: give a folder under the adapter root")
    if ".." in Path(folder).parts:
        raise AdapterFileError(f"adapter path {folder!r}: '..' is not allowed")
    real_root = Path(os.path.realpath(root))
    candidate = Path(folder) if os.path.isabs(folder) else real_root / folder
    real = Path(os.path.realpath(candidate))
    if not real.is_relative_to(real_root):
        raise AdapterFileError(f"adapter path {folder!r}: outside the adapter root")
    if not real.is_dir():
        raise AdapterFileError(f"adapter path {folder!r}: no such folder under the adapter root")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        path = real / name
        if not path.is_file():
            hint = " (only safetensors weights are loaded)" if name == WEIGHTS_FILE else ""
            raise AdapterFileError(f"adapter path {folder!r}: no {name}{hint}")
        if not Path(os.path.realpath(path)).is_relative_to(real_root):
            raise AdapterFileError(f"adapter path {folder!r}: {name} links outside the adapter root")
    return real


def check_safetensors_folder(folder: str) -> str:
    """For adapters named on the command line (trusted paths): still safetensors only."""
    if not (Path(folder) / WEIGHTS_FILE).is_file():
        raise AdapterFileError(f"{folder}: no {WEIGHTS_FILE} here (the server loads safetensors weights only)")
    return folder


class AdapterRegistry:
    """Adapter names and their folders, as the HTTP side sees them; used from the event loop only."""

    def __init__(self, base_name: str, max_adapters: int) -> None:
        self.base_name = base_name
        self.max_adapters = max_adapters
        self.loaded: dict[str, str] = {}
        self.busy: set[str] = set()  # being loaded or deleted

    def reserve(self, name: str) -> None:
        """Claim a new name before loading, so two loads cannot race for it."""
        check_name(name)
        if name == self.base_name or name in self.loaded or name in self.busy:
            raise AdapterNameError(f"adapter name {name!r} is already taken")
        if len(self.loaded) + len(self.busy) >= self.max_adapters:
            raise AdapterLimitError(f"the server already holds {self.max_adapters} adapters (--max-adapters); "
                                    "delete one first")
        self.busy.add(name)

    def settle(self, name: str, folder: str | None) -> None:
        """End a load (folder: it succeeded) or a delete (None)."""
        self.busy.discard(name)
        if folder is None:
            self.loaded.pop(name, None)
        else:
            self.loaded[name] = folder

    def start_delete(self, name: str) -> None:
        if name not in self.loaded or name in self.busy:
            raise AdapterNameError(f"unknown adapter {name!r}")
        self.busy.add(name)
        del self.loaded[name]

    def adapter_for(self, model: str) -> str | None:
        """The adapter a request's `model` selects; the base model's name selects none."""
        if model == self.base_name:
            return None
        if model not in self.loaded:
            known = ", ".join([self.base_name, *sorted(self.loaded)])
            raise AdapterNameError(f"model {model!r} does not exist (available: {known})")
        return model
