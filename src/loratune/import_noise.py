"""Keep other libraries' import-time chatter off a user's stderr.

transformers imports torchao when it is installed (it is a test-time reference for loratune), and that
import logs about compiled kernels it cannot load on this machine and about enum registrations torch has
deprecated. Those lines say nothing about the user's run, so the command-line tool drops exactly them;
every other message of these loggers still shows.
"""

from __future__ import annotations

import logging
import sys

# (logger, a fragment of the message): each filter drops only records whose text holds its fragment
KNOWN_NOISE: tuple[tuple[str, str], ...] = (
    ("torchao", "Failed to load "),
    ("torchao", "Skipping import of cpp extensions"),
    ("torch.utils._pytree", "is an Enum subclass and is now natively supported"),
)


class _DropFragment(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def silence_import_noise() -> None:
    """Install the filters (once); call before transformers is imported."""
    for logger_name, fragment in KNOWN_NOISE:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropFragment) and f.fragment == fragment for f in logger.filters):
            logger.addFilter(_DropFragment(fragment))


def quiet_libraries() -> None:
    """Keep transformers' own progress bars and warnings off the terminal when it is not interactive.

    Every loratune process calls this first: the command itself and the runs `compare` starts in children."""
    silence_import_noise()  # before transformers imports torchao
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    if not sys.stderr.isatty():
        transformers_logging.disable_progress_bar()
