"""Stopping on purpose: SIGTERM / SIGUSR1 (what SLURM sends before a job's time is up or when it
is preempted), Ctrl-C (SIGINT), a step to stop at, and a time limit.

A signal handler only sets a flag, so a second signal during a checkpoint save changes nothing,
with one exception: a second Ctrl-C, which ends the process at once (after removing a checkpoint
it was half-way through writing), for a user who will not wait for the checkpoint.
Ranks agree on stopping through an all-reduce over a separate gloo group: a CPU collective,
with no host-device sync in the training loop, so all of them stop after the same step even
when only one rank got the signal.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import sys
import threading
import time
from collections import deque
from pathlib import Path

from dist_lm.files import write_atomic
from dist_lm.runtime.distributed import any_rank, any_rank_each, is_rank0
from dist_lm.store.state import STATE
from dist_lm.train.exits import Exit

# Set by the launch templates (launchers/exit_status.sh): a launcher would take a rank's 75 for a
# failure, so rank 0 writes the status to this file, every rank exits 0, and the template exits 75.
STATUS_FILE_VARIABLE = "DIST_LM_STATUS_FILE"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
RECENT_STEPS = 10  # the steps whose median is what one more step is expected to take
# A SIGINT this soon after the first is the same Ctrl-C: torchrun passes the terminal's Ctrl-C on
# to its workers, which get both within milliseconds.
REPEATED_INTERRUPT_S = 0.5
WRITE_FAILED = "a rank could not write its logs"


def status_for_the_launcher(status: int, rank0: bool) -> int:
    """The exit status for this rank to exit with (see STATUS_FILE_VARIABLE)."""
    path = os.environ.get(STATUS_FILE_VARIABLE)
    if status != Exit.REQUEUE or not path:
        return status
    if rank0:
        write_atomic(path, f"{status}\n")
    return 0


def seconds_to_keep(recent_steps: list[float], save_seconds: float, eval_seconds: float) -> float:
    """Time to leave before train.time_limit_minutes: one more step and a checkpoint save, each
    counted twice for a margin, and the evaluation the next step holds (0 if none). A step is the
    median of the recent ones, not the longest: the steps that compiled (the first, 2-6 minutes in
    the compiled presets; DeepCompile's sixth), evaluated or saved are not what the next one costs,
    and a margin of twice the first step's compilation threw away minutes of every allocation."""
    step = statistics.median(recent_steps) if recent_steps else 0.0
    return 2 * step + 2 * save_seconds + eval_seconds


class StopControl:
    def __init__(self, stop_at_step: int | None, time_limit_minutes: float | None, start_time: float):
        self.stop_at_step = stop_at_step
        self.deadline = start_time + 60 * time_limit_minutes if time_limit_minutes else None
        self.signal_name: str | None = None
        self.recent_steps: deque[float] = deque(maxlen=RECENT_STEPS)
        self.saving: Path | None = None
        """The checkpoint directory being written, while it is (set by the trainer)."""
        self.how_to_continue = "run the same command again to continue from it"
        """Said when a second Ctrl-C ends the run (the session names the run once it has a name)."""
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)
        wakeup, written = os.pipe()
        os.set_blocking(written, False)
        signal.set_wakeup_fd(written, warn_on_full_buffer=False)
        threading.Thread(target=self._watch_interrupts, args=(wakeup,), name="interrupts", daemon=True).start()

    def _on_signal(self, signum: int, _frame) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def _watch_interrupts(self, wakeup: int) -> None:
        """A thread reading the signal numbers Python's C-level handler writes to the wakeup pipe
        as each signal arrives: it sees a second Ctrl-C at once, also while the main thread waits
        in a collective (where a Python-level handler would not run until it returns)."""
        first = None
        while data := os.read(wakeup, 64):
            for signum in data:
                if signum != signal.SIGINT:
                    continue
                now = time.monotonic()
                if first is not None and now - first >= REPEATED_INTERRUPT_S:
                    self._exit_at_once()
                first = first or now

    def _exit_at_once(self) -> None:
        """A second Ctrl-C: no checkpoint, no wait. A checkpoint being written is removed (it is
        not complete until its state.json), so the newest complete one stays what a restart
        resumes. os._exit: the process group cannot be left cleanly from here."""
        saving = self.saving
        if saving is not None and is_rank0() and not (saving / STATE).exists():
            shutil.rmtree(saving, ignore_errors=True)
        if is_rank0():
            print(
                "error: interrupted again (Ctrl-C twice): stopped at once, without a checkpoint of the steps since "
                f"the last one, which is kept; {self.how_to_continue}",
                file=sys.stderr,
            )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(Exit.INTERRUPTED)

    def signalled(self) -> bool:
        """Has any rank been signalled? (A collective: every rank calls it at the same point.)"""
        flag = any_rank(self.signal_name is not None)
        if flag and not self.signal_name:
            self.signal_name = "a signal to another rank"
        return flag

    def reason_to_stop(
        self,
        step: int,
        step_seconds: float,
        save_seconds: float,
        next_eval_seconds: float = 0.0,
        write_failed: bool = False,
    ) -> str | None:
        """Why to stop after ``step``, or None. A collective, called by every rank after every step.
        ``next_eval_seconds``: what the evaluation in the next step will take, if it has one.
        ``write_failed``: this rank could not write its logs (WRITE_FAILED on every rank then)."""
        self.recent_steps.append(step_seconds)
        out_of_time = self.deadline is not None and (
            time.perf_counter() + seconds_to_keep(list(self.recent_steps), save_seconds, next_eval_seconds)
            >= self.deadline
        )
        signalled, out_of_time, write_failed = any_rank_each([self.signal_name is not None, out_of_time, write_failed])
        if write_failed:
            return WRITE_FAILED
        if signalled:
            self.signal_name = self.signal_name or "a signal to another rank"
            return f"received {self.signal_name}"
        if out_of_time:
            return "train.time_limit_minutes is nearly up"
        if self.stop_at_step is not None and step >= self.stop_at_step:
            return f"train.stop_at_step={self.stop_at_step}"
        return None
