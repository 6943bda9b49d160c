"""The optional parts of loratune and the extra that installs each, so that a missing one is one line
naming the extra instead of an ImportError from deep inside."""

from __future__ import annotations

import importlib.util

from loratune.errors import MissingExtraError

# extra name -> the modules it brings (pyproject.toml's [project.optional-dependencies] lists the packages)
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn"),
    "export": ("gguf",),
    "plot": ("matplotlib",),
}


def has_extra(extra: str) -> bool:
    """Whether every module of `extra` can be imported (found without importing it)."""
    return all(_importable(module) for module in EXTRAS[extra])


def require_extra(extra: str, what: str) -> None:
    """Raise a one-line `MissingExtraError` when `extra` is not installed; `what` names what needs it."""
    if not has_extra(extra):
        raise MissingExtraError(f"{what} needs the {extra} extra: pip install 'loratune[{extra}]'")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a blocked or half-initialised module
        return False
