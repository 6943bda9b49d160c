"""Exceptions for user errors of the application on top of the core: data, model loading, quantization.

Like the core's errors (`loratune.core.errors`), each is a `LoratuneError` with a one-line message.
"""

from loratune.core.errors import LoratuneError


class DataError(LoratuneError, ValueError):
    """A data file or record is malformed; the message names file, line and field."""


class ModelLoadError(LoratuneError, ValueError):
    """A model could not be found or loaded."""


class QuantizationError(LoratuneError, ValueError):
    """A layer cannot be stored in the requested format, or a quantized weight cannot do what was asked."""


class ReportedByAnotherRank(LoratuneError):
    """Under torchrun: the error was found on every rank; rank 0 reports it and the others exit quietly."""


class MissingExtraError(LoratuneError, ImportError):
    """An optional part of loratune is not installed; the message names the extra that installs it."""
