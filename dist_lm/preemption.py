"""Stopping on purpose: SIGTERM / SIGUSR1 (what SLURM sends before a job's time is up or when it
is preempted), a step to stop at, and a time limit.

A signal handler only sets a flag, so a second signal during a checkpoint save changes nothing.
Ranks agree on stopping through an all-reduce over a separate gloo group: a CPU collective,
with no host-device sync in the training loop, so all of them stop after the same step even
when only one rank got the signal.
"""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

from dist_lm.distributed import any_rank, control_group

REQUEUE_EXIT = 75  # EX_TEMPFAIL: "stopped by a signal after saving a checkpoint; run me again"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopControl:
    def __init__(self, stop_at_step: int | None, time_limit_minutes: float | None, start_time: float):
        self.stop_at_step = stop_at_step
        self.deadline = start_time + 60 * time_limit_minutes if time_limit_minutes else None
        self.signal_name: str | None = None
        self.longest_step = 0.0
        self._group = control_group()
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def signalled(self) -> bool:
        """Has any rank been signalled? (A collective: every rank calls it at the same point.)"""
        flag = any_rank(self.signal_name is not None)
        if flag and not self.signal_name:
            self.signal_name = "a signal to another rank"
        return flag

    def reason_to_stop(self, step: int, step_seconds: float, save_seconds: float) -> str | None:
        """Why to stop after ``step``, or None. A collective, called by every rank after every step."""
        self.longest_step = max(self.longest_step, step_seconds)
        out_of_time = self.deadline is not None and (
            # leave room for one more step and a checkpoint save, with a margin
            time.perf_counter() + 2 * self.longest_step + 2 * save_seconds >= self.deadline)
        flags = torch.tensor([1.0 if self.signal_name else 0.0, 1.0 if out_of_time else 0.0])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        if flags[0]:
            self.signal_name = self.signal_name or "a signal to another rank"
            return f"received {self.signal_name}"
        if flags[1]:
            return "train.time_limit_minutes is nearly up"
        if self.stop_at_step is not None and step >= self.stop_at_step:
            return f"train.stop_at_step={self.stop_at_step}"
        return None
