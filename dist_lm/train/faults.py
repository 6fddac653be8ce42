"""Faults in training: updates skipped for NaN/inf gradients, loss spikes, and running out of GPU
memory."""

from __future__ import annotations

import math
import sys
from collections import deque
from pathlib import Path

import torch

from dist_lm.train import checkpoint
from dist_lm.runtime import distributed
from dist_lm.observe import metrics
from dist_lm.train.exits import Exit


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient (train.check_finite), or too many skipped updates."""


class ExitOnOutOfMemory:
    """``with`` block (reusable) that turns CUDA running out of memory into one line saying what
    to change, and exit status Exit.OUT_OF_MEMORY, so that a caller (tools/find_batch.py, a sweep,
    a job script) can tell "too big for this GPU" from every other failure.

    By SystemExit, so that ``finally`` blocks still close files, while code after them (the
    distributed teardown, whose barrier other ranks may never reach) is skipped. The last
    checkpoint stays as it was."""

    def __init__(self, rank: int, micro_batch_size: int, seq_len: int):
        self.rank, self.micro_batch_size, self.seq_len = rank, micro_batch_size, seq_len

    def __enter__(self) -> None:
        pass

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None and issubclass(kind, torch.OutOfMemoryError):
            print(f"error: rank {self.rank} ran out of GPU memory at micro-batch {self.micro_batch_size} x seq "
                  f"{self.seq_len}: lower train.micro_batch_size (tools/find_batch.py finds the largest that "
                  "fits), or set parallel.activation_checkpointing=true or a higher parallel.zero_stage",
                  file=sys.stderr)
            distributed.leave_alone()
            raise SystemExit(Exit.OUT_OF_MEMORY) from None


class SpikeGuard:
    """Flags a loss above ``factor`` x the mean of the last WINDOW accepted losses (once
    MIN_HISTORY of them are known); flagged losses stay out of the mean."""

    WINDOW, MIN_HISTORY = 50, 10

    def __init__(self, factor: float):
        self.factor = factor
        self.history: deque[float] = deque(maxlen=self.WINDOW)

    @property
    def mean(self) -> float:
        return sum(self.history) / len(self.history) if self.history else math.nan

    def check(self, loss: float) -> bool:
        spike = len(self.history) >= self.MIN_HISTORY and not loss <= self.factor * self.mean  # NaN is a spike
        if not spike:
            self.history.append(loss)
        return spike


class SkipCounter:
    """Counts updates skipped for NaN/inf gradients; too many in a row end the run."""

    def __init__(self, limit: int, precision: str, checkpoints: Path | str):
        self.limit, self.precision, self.checkpoints = limit, precision, Path(checkpoints)
        self.in_a_row = 0
        self.first_skipped: int | None = None  # the step of the first skip of those in a row
        self.total = 0  # over the whole run (kept in the checkpoint)

    def update(self, applied: bool, grad_norm, step: int) -> None:
        """After the optimizer step ``step``: was its update applied? (Every rank agrees.)"""
        if applied:
            self.in_a_row, self.first_skipped = 0, None
            return
        self.in_a_row += 1
        self.total += 1
        if self.first_skipped is None:
            self.first_skipped = step
        what = "fp16 overflow, loss scale lowered" if self.precision == "fp16" else f"gradient norm {float(grad_norm)}"
        metrics.warn(f"step {step}: update skipped ({what}); {self.in_a_row} in a row, {self.total} in this run")
        if self.limit and self.in_a_row >= self.limit:
            good = [p for p in checkpoint.complete_checkpoints(self.checkpoints)
                    if checkpoint.step_of(p) < self.first_skipped]
            where = f"is {good[-1]}" if good else f"none: no checkpoint in {self.checkpoints} is older than step " \
                f"{self.first_skipped}"
            raise TrainingDiverged(f"{self.limit} updates in a row were skipped for NaN/inf gradients "
                                   f"(train.max_skipped_steps) from step {self.first_skipped}; the last good checkpoint "
                                   f"{where}: lower optim.lr or check the data of those steps")
