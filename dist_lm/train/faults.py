"""Faults in training: updates skipped for NaN/inf gradients, loss spikes, and running out of GPU
memory."""

from __future__ import annotations

import json
import math
import sys
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist

from dist_lm.config.layout import ParallelLayout
from dist_lm.observe import log
from dist_lm.runtime import distributed, engine
from dist_lm.runtime.precision import Precision
from dist_lm.store import checkpoints
from dist_lm.train.exits import Exit


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient (train.check_finite), or too many skipped updates."""


class ExitOnOutOfMemory:
    """``with`` block (reusable) that turns CUDA running out of memory into one line saying what
    to change, and exit status Exit.OUT_OF_MEMORY, so that a caller (dist-lm find-batch, a sweep,
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
            print(
                f"error: rank {self.rank} ran out of GPU memory at micro-batch {self.micro_batch_size} x seq "
                f"{self.seq_len}: lower train.micro_batch_size (dist-lm find-batch finds the largest that "
                "fits), or set parallel.activation_checkpointing=true or a higher parallel.zero_stage",
                file=sys.stderr,
            )
            distributed.leave_alone()
            raise SystemExit(Exit.OUT_OF_MEMORY) from None


class SpikeGuard:
    """Flags a loss above ``factor`` x the mean of the last WINDOW accepted losses (once
    MIN_HISTORY of them are known); flagged losses stay out of the mean. ``run_dir``: where
    spikes.jsonl records them (rank 0); ``skip``: whether a spiking micro-batch is dropped."""

    WINDOW, MIN_HISTORY = 50, 10

    def __init__(self, factor: float, run_dir: Path | None = None, skip: bool = False):
        self.factor, self.skip = factor, skip
        self.history: deque[float] = deque(maxlen=self.WINDOW)
        self.records = run_dir / "spikes.jsonl" if run_dir is not None and distributed.is_rank0() else None
        self.failure: str | None = None

    @property
    def mean(self) -> float:
        return sum(self.history) / len(self.history) if self.history else math.nan

    def check(self, loss: float) -> bool:
        spike = len(self.history) >= self.MIN_HISTORY and not loss <= self.factor * self.mean  # NaN is a spike
        if not spike:
            self.history.append(loss)
        return spike

    def check_micro_batch(
        self, loss: torch.Tensor, step: int, micro: int, micros: int, ids, layout: ParallelLayout
    ) -> bool:
        """Whether to drop this micro-batch: its loss, averaged over the data-parallel ranks (a
        collective over all of them: the sequence-parallel ranks' losses are shares that sum to
        their window's, the tensor-parallel ranks' are copies), spikes and ``skip`` is on. A
        spike is logged with the global sample ids of the micro-batch on every rank (``ids``:
        this rank's ids of the step's ``micros`` micro-batches)."""
        world_size = dist.get_world_size()
        mean_loss = loss.detach().float().clone()
        dist.all_reduce(mean_loss)  # host-device sync per micro-batch: only with the guard on
        value = mean_loss.item() / (layout.dp_size * layout.loss_copies)
        if not self.check(value):
            return False
        micro_size = len(ids) // micros
        everyone: list = [None] * world_size
        dist.all_gather_object(everyone, ids[micro * micro_size : (micro + 1) * micro_size].tolist())
        record = {
            "step": step,
            "micro_batch": micro,
            "loss": value,
            "running_mean": self.mean,
            "skipped": self.skip,
            "sample_ids": sorted({i for rank_ids in everyone for i in rank_ids}),  # a model-parallel group shares them
        }
        log.warn(
            f"step {step}: loss spike {value:.4f} > {self.factor} x running mean {record['running_mean']:.4f} "
            f"on samples {record['sample_ids']}" + ("; skipped" if self.skip else "")
        )
        if self.records is not None and self.failure is None:
            try:
                with open(self.records, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:  # a full disk: the trainer ends the run with one line
                self.failure = f"writing {self.records} failed ({e.strerror or e})"
        return self.skip


def check_finite(model_engine, loss_sum: torch.Tensor, step: int) -> None:
    """Raise TrainingDiverged, on every rank alike, if step ``step``'s loss or any gradient is NaN
    or inf (train.check_finite)."""
    bad = engine.first_nonfinite_grad(model_engine)  # a collective under ZeRO-3: every rank calls
    loss_bad = torch.tensor(0.0 if torch.isfinite(loss_sum) else 1.0, device=loss_sum.device)
    dist.all_reduce(loss_bad, op=dist.ReduceOp.MAX)  # losses are per rank: agree before raising
    if loss_bad.item():
        raise TrainingDiverged(
            f"step {step}: loss is not finite on some rank" + (f"; first non-finite gradient: {bad}" if bad else "")
        )
    if bad is not None:
        raise TrainingDiverged(f"step {step}: gradient of {bad} is not finite")


class FlagInFlight:
    """A one-element bool tensor on its way to the host: on a GPU, copied into pinned memory without
    waiting, then read when the copy is done. Reading the device tensor itself (``bool(t)``,
    ``.item()``) would wait for everything launched on the stream so far, since a copy to the
    host is ordered after all of it: read a step late that way, the flag still made the host wait
    for the step just launched, and the GPU idle while the host launched the next one."""

    def __init__(self) -> None:
        self._host: torch.Tensor | None = None  # pinned, made on first use, reused
        self._copied: torch.cuda.Event | None = None

    def send(self, flag: torch.Tensor) -> None:
        if flag.device.type != "cuda":
            self._host, self._copied = flag, None
            return
        if self._copied is None:
            self._host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self._copied = torch.cuda.Event()
        self._host.copy_(flag.reshape(()), non_blocking=True)
        self._copied.record()

    def read(self) -> bool:
        """Waits only for the work launched before ``send``."""
        if self._copied is not None:
            self._copied.synchronize()
        return bool(self._host)


class SkipCounter:
    """Counts updates skipped for NaN/inf gradients; too many in a row end the run."""

    def __init__(self, limit: int, precision: Precision, checkpoints: Path | str):
        self.limit, self.precision, self.checkpoints = limit, precision, Path(checkpoints)
        self.in_a_row = 0
        self.first_skipped: int | None = None  # the step of the first skip of those in a row
        self.total = 0  # over the whole run (kept in the checkpoint)
        self.flag = FlagInFlight()
        self.pending: tuple[object, int] | None = None  # (grad_norm, step) of the flag in flight

    def update(self, applied: bool | torch.Tensor, grad_norm, step: int) -> None:
        """After the optimizer step ``step``: was its update applied? (Every rank agrees.) A flag
        still on the device (the optimizer skipped on the device: dist_lm.runtime.engine.step) is
        sent to the host without waiting and read at the next step's update, when the GPU has
        finished this step, so the host never waits for the GPU. While updates are being skipped
        the flag is read at once, so that train.max_skipped_steps ends the run at the step that
        reaches it, not one step later."""
        self.settle()
        if isinstance(applied, torch.Tensor):
            self.flag.send(applied)
            self.pending = (grad_norm, step)
            if self.in_a_row:
                self.settle()
        else:
            self._count(applied, grad_norm, step)

    def settle(self) -> None:
        """Count the step whose flag is still in flight (before a checkpoint, and at the end)."""
        if self.pending is not None:
            grad_norm, step = self.pending
            self.pending = None
            self._count(self.flag.read(), grad_norm, step)

    def _count(self, applied: bool, grad_norm, step: int) -> None:
        if applied:
            self.in_a_row, self.first_skipped = 0, None
            return
        self.in_a_row += 1
        self.total += 1
        if self.first_skipped is None:
            self.first_skipped = step
        what = (
            "fp16 overflow, loss scale lowered"
            if self.precision is Precision.FP16
            else f"gradient norm {float(grad_norm)}"
        )
        log.warn(f"step {step}: update skipped ({what}); {self.in_a_row} in a row, {self.total} in this run")
        if self.limit and self.in_a_row >= self.limit:
            raise TrainingDiverged(
                f"{self.limit} updates in a row were skipped for NaN/inf gradients "
                f"(train.max_skipped_steps) from step {self.first_skipped}; "
                f"{self.last_good()}: lower optim.lr or check the data of those steps"
            )

    def last_good(self) -> str:
        """Which checkpoint predates the skipped updates, said for the error: the run goes back to it."""
        good = [
            p for p in checkpoints.complete_checkpoints(self.checkpoints) if checkpoints.step_of(p) < self.first_skipped
        ]
        if good:
            return f"the last good checkpoint is {good[-1]}"
        return (
            f"no checkpoint in {self.checkpoints} was saved before step {self.first_skipped}, so there is none "
            "to go back to"
        )

    def check_run_end(self) -> None:
        """A run that ends (max_steps) while its updates are being skipped has trained on nothing
        since the first of them, and saves no checkpoint of it: that is a divergence, not a success."""
        self.settle()
        if self.in_a_row:
            raise TrainingDiverged(
                f"the run ended with its last {self.in_a_row} updates skipped for NaN/inf gradients "
                f"(from step {self.first_skipped}), so no checkpoint was saved of them; "
                f"{self.last_good()}: lower optim.lr or check the data of those steps"
            )
