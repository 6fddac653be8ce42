"""The fault bookkeeping on its own (the real-process behaviour is in test_checkpoints, and for
running out of GPU memory in test_gpu)."""

from __future__ import annotations

import math

import pytest
import torch

from dist_lm.train.exits import Exit
from dist_lm.train.faults import ExitOnOutOfMemory, SkipCounter, SpikeGuard, TrainingDiverged


def test_spike_guard_waits_for_history_and_keeps_spikes_out_of_the_mean():
    guard = SpikeGuard(1.5)
    assert not any(guard.check(2.0) for _ in range(SpikeGuard.MIN_HISTORY))
    assert guard.check(3.5) and guard.mean == 2.0  # 3.5 > 1.5 x 2.0, and not averaged in
    assert not guard.check(2.9) and guard.check(math.nan)


def test_skip_counter_resets_on_an_applied_update_and_stops_at_the_limit():
    skips = SkipCounter(limit=3, precision="bf16", checkpoints="/runs/x/checkpoints")
    skips.update(False, float("nan"), 1)
    skips.update(False, float("inf"), 2)
    skips.update(True, 1.0, 3)
    assert (skips.in_a_row, skips.total) == (0, 2)
    skips.update(False, float("nan"), 4)
    skips.update(False, float("nan"), 5)
    with pytest.raises(TrainingDiverged, match=r"3 updates in a row .* /runs/x/checkpoints"):
        skips.update(False, float("nan"), 6)


def test_skip_counter_reads_a_flag_on_the_device_one_step_late():
    """A flag the optimizer left on the device (engine.step at ZeRO-0 with fp32 weights) is
    counted at the next update, or at settle() (before a checkpoint), not when it is given."""
    skips = SkipCounter(limit=2, precision="bf16-autocast", checkpoints="/runs/x/checkpoints")
    skips.update(torch.tensor(False), torch.tensor(float("nan")), 1)
    assert (skips.in_a_row, skips.total) == (0, 0)
    skips.settle()
    assert (skips.in_a_row, skips.total, skips.first_skipped) == (1, 1, 1)
    skips.update(torch.tensor(True), torch.tensor(1.0), 2)
    skips.update(torch.tensor(False), torch.tensor(float("inf")), 3)
    assert (skips.in_a_row, skips.total) == (0, 1)  # step 2 counted, step 3 still on the device
    # Step 4's update counts step 3, a skip; from then on each flag is read when it is given, so
    # the limit ends the run at step 4, the step that reaches it, without waiting for step 5.
    with pytest.raises(TrainingDiverged, match=r"2 updates in a row .* from step 3"):
        skips.update(torch.tensor(False), torch.tensor(float("nan")), 4)
    assert (skips.in_a_row, skips.pending) == (2, None)


def test_out_of_memory_becomes_one_line_and_its_own_exit_status(capsys):
    guard = ExitOnOutOfMemory(rank=1, micro_batch_size=64, seq_len=2048)
    with guard:  # nothing raised: nothing happens
        pass
    for _ in range(2):  # the same guard serves the engine's construction and then training
        with pytest.raises(SystemExit) as stopped, guard:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
        assert stopped.value.code == Exit.OUT_OF_MEMORY
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "rank 1 ran out of GPU memory at micro-batch 64 x seq 2048" in err
        assert "train.micro_batch_size" in err and "dist-lm find-batch" in err
    with pytest.raises(RuntimeError, match="another failure"), guard:  # anything else passes through
        raise RuntimeError("another failure")


def test_the_shell_scripts_read_the_same_exit_statuses():
    import subprocess
    import sys

    from conftest import ROOT

    out = subprocess.run(
        [sys.executable, "-m", "dist_lm.train.exits", "--shell"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    assert dict(line.split("=") for line in out.splitlines()) == {f"EXIT_{e.name}": str(e.value) for e in Exit}
    assert "EXIT_REQUEUE=75" in out.splitlines()
