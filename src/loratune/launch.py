"""`loratune train --nproc N`: torchrun's agent inside this process, so the command acts as one process does.

Running the agent here (torch's `elastic_launch`, what the `torchrun` command runs) rather than as a child
keeps the job one process to the user: SIGTERM or Ctrl-C reaches the agent, which passes it to every rank
and waits while they finish their step and checkpoint (the ranks run in sessions of their own, so a terminal's
Ctrl-C arrives once, through the agent); the ranks' exit code is the command's (2 for an error rank 0 has
already printed in one line, 143/130 after a stop), with no launcher traceback. `LORATUNE_NPROC` tells
the ranks the count, so the resume command they print includes `--nproc N`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid

NPROC_VARIABLE = "LORATUNE_NPROC"
SHUTDOWN_SECONDS = 600  # how long a stopped rank may take to finish its step and checkpoint before SIGKILL


def launch(rank_argv: list[str], nproc: int) -> int:
    """Run `python -m loratune *rank_argv` as `nproc` ranks on this machine; returns the command's exit code."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # we say what failed, once
    previous = os.environ.get(NPROC_VARIABLE)
    os.environ[NPROC_VARIABLE] = str(nproc)  # inherited by the ranks
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.5, shutdown_timeout=SHUTDOWN_SECONDS)
    try:
        elastic_launch(config, sys.executable)("-m", "loratune", *rank_argv)
    except SignalException as exc:  # the ranks were passed the signal, and have ended
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        return _exit_code(exc)
    finally:
        if previous is None:
            os.environ.pop(NPROC_VARIABLE, None)
        else:
            os.environ[NPROC_VARIABLE] = previous
    return 0


def _exit_code(failed) -> int:
    """The code of the rank that failed first, preferring one that exited on its own (the others may have been
    stopped by the agent); a rank killed by a signal gets the one line no rank could print."""
    rank, failure = min(failed.failures.items(), key=lambda item: (item[1].exitcode < 0, item[1].timestamp, item[0]))
    if failure.exitcode >= 0:
        return failure.exitcode or 1
    try:
        name = signal.Signals(-failure.exitcode).name
    except ValueError:
        name = f"signal {-failure.exitcode}"
    print(f"loratune: error: rank {rank} (pid {failure.pid}) was killed by {name}; the job has ended",
          file=sys.stderr)
    return 128 - failure.exitcode


def launched_nproc() -> int | None:
    """The --nproc this rank was launched with, or None outside `loratune train --nproc`."""
    value = os.environ.get(NPROC_VARIABLE, "")
    return int(value) if value.isdigit() else None
