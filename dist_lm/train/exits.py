"""The exit statuses of a training run (launchers/pretrain.py), in one table.

Python code uses ``Exit``; the shell scripts read the same table through
``python -m dist_lm.train.exits --shell`` (launchers/exit_status.sh), which prints ``EXIT_<NAME>=<status>``
lines to eval.
"""

from __future__ import annotations

import sys
from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    DIVERGED = 1  # a non-finite loss or gradient (train.check_finite), or too many skipped updates
    BAD_INPUT = 2  # config, data, checkpoint or launch environment; or a checkpoint that could not be written
    HANG = 3  # a rank stopped answering, or a save did not finish in time (dist_lm.train.watchdog)
    OUT_OF_MEMORY = 4  # CUDA ran out of memory: "too big for this GPU" (dist-lm find-batch)
    REQUEUE = 75  # EX_TEMPFAIL: stopped on purpose (a signal) after saving a checkpoint; run me again
    INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C (after a checkpoint; a second Ctrl-C: at once, without one)


def shell_assignments() -> str:
    return "".join(f"EXIT_{e.name}={e.value}\n" for e in Exit)


if __name__ == "__main__":
    if sys.argv[1:] != ["--shell"]:
        sys.exit("usage: python -m dist_lm.train.exits --shell")
    print(shell_assignments(), end="")
