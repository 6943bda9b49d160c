"""SIGINT (Ctrl-C) and SIGTERM (schedulers, `timeout`, container stops) end a run without losing it: the
current step finishes, a checkpoint is written whatever `checkpoint_every` says, and the run ends with
`RunStopped`, whose message says how to resume. A second SIGINT stops at once (KeyboardInterrupt).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loratune.core.errors import LoratuneError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunStopped(LoratuneError):
    """The run was stopped by a signal; `checkpoint` holds its progress (None: stopped before training began).

    `exit_code` is the shell's convention for a signal: 128 + its number (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None) -> None:
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        self.exit_code = 128 + signal.Signals[signal_name].value
        super().__init__(self.message())

    def message(self, resume_command: str = "the same config and --resume") -> str:
        if self.checkpoint is None:
            return f"stopped by {self.signal_name} before training began; nothing was saved"
        return (f"stopped by {self.signal_name} after step {self.step}; checkpoint {self.checkpoint} saved; "
                f"resume with {resume_command}")


class StopRequests:
    """Which stop signal arrived, if any; the run checks `requested` between steps."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, without a checkpoint
        if not self.requested:
            self.signal_name = signal.Signals(signum).name
            print(f"loratune: {self.signal_name} received: finishing this step and saving a checkpoint "
                  "(Ctrl-C again stops at once)", file=sys.stderr, flush=True)


@contextmanager
def stop_requests() -> Iterator[StopRequests]:
    """Catch SIGINT and SIGTERM while the block runs; the previous handlers come back afterwards.

    Outside the main thread signals cannot be caught, and the block runs with the handlers it had.
    """
    requests = StopRequests()
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return
    previous = {sig: signal.signal(sig, requests._handle) for sig in SIGNALS}
    try:
        yield requests
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
