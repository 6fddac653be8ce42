"""One process (one job's rank 0) owns a run directory at a time: an exclusive ``flock`` on
RUN_DIR/.lock, held while the process lives. Two runs writing one directory interleave
metrics.jsonl, delete each other's rows and leave config.yaml describing the wrong model.

The kernel drops the lock when its process dies however it dies (kill -9, a lost node), so a
SLURM requeue or a restart after a crash reuses the directory without anyone removing a file.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import IO

from dist_lm.config.schema import UserError

LOCK = ".lock"


class RunDirInUse(UserError):
    """Another live process holds the run directory."""


def lock(run_dir: Path) -> IO[str]:
    """Take the run directory's lock; the open file holds it (keep it until the process ends).
    Raises RunDirInUse, naming the holder, if another process has it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunDirInUse(f"run error: {run_dir} is in use by another run (pid@host {holder}, holding "
                          f"{run_dir / LOCK}); wait for it or stop it, or give this run another run.name or "
                          "run.dir") from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}@{socket.gethostname()}\n")
    handle.flush()
    return handle
