"""Exceptions for user errors of the LoRA core (the application's own are in `loratune.errors`): each
carries a one-line message that names the problem and where it is.

The command-line tool prints `str(error)` for any `LoratuneError` and exits non-zero, so messages must
stand on their own, without a traceback.
"""


class LoratuneError(Exception):
    """Base class for every error caused by input (configs, files, names), not by a bug."""


class ConfigError(LoratuneError, ValueError):
    """A configuration value or key is invalid."""


class TargetError(LoratuneError, ValueError):
    """`target_modules` (or a related pattern) matched nothing, or matched a module that cannot be adapted."""


class AdapterNameError(LoratuneError, KeyError):
    """An adapter name is unknown, or already taken."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AdapterFileError(LoratuneError, ValueError):
    """An adapter folder or file is missing, corrupt, unsafe, or does not fit the model."""


class MergeError(LoratuneError, ValueError):
    """Merging would produce non-finite weights, or the adapter cannot be merged."""


class WriteError(LoratuneError, OSError):
    """A file could not be written (disk full, no permission); the message names the path and the cause.

    An `OSError` too, so callers that handle failed writes of any origin keep working; `filename` and
    `strerror` hold the path and the cause, while the message stays the one line it was given.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
