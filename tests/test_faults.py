"""The numerical-fault bookkeeping on its own (the real-process behaviour is in test_checkpoints)."""

from __future__ import annotations

import math

import pytest

from dist_lm.faults import SkipCounter, SpikeGuard, TrainingDiverged


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
