"""Stopping on purpose and continuing: train.stop_at_step, train.time_limit_minutes, and
SIGUSR1 (what SLURM sends) to one rank of a real two-process job."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, assert_ok, free_port, launch, read_metrics
from dist_lm.train.exits import Exit

BASE = ["--config", "debug", "train.log_interval=1", "train.eval_interval=0", "logging.wandb=disabled"]


def test_stop_at_step_then_continue_equals_an_uninterrupted_run(env, ds_ops, tmp_path):
    """Stopped at step 3, in the middle of a logging window of 2: the row of step 4 averages steps
    3 and 4 in both runs, to the bit (the checkpoint keeps the window's sums)."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    args = [*BASE, "train.max_steps=6", "train.log_interval=2"]
    assert_ok(launch("python", [*args, f"run.dir={whole}"], env))
    proc = launch("python", [*args, "train.stop_at_step=3", f"run.dir={split}"], env)
    assert_ok(proc)
    assert "stopping after step 3 of 6: train.stop_at_step=3" in proc.stdout
    assert (split / "checkpoints" / "latest").read_text().strip() == "step00000003"
    assert_ok(launch("python", [*args, f"run.dir={split}"], env))
    expected = [r["loss"] for r in read_metrics(whole)[0]]
    got = [r["loss"] for r in read_metrics(split)[0]]
    assert [r["step"] for r in read_metrics(split)[0]] == [2, 4, 6]
    assert got == expected
    proc = launch("python", [*args, f"run.dir={split}"], env)  # a finished run has nothing left to do
    assert_ok(proc)
    assert "nothing to do: the run is already at step 6" in proc.stdout


def test_time_limit_stops_with_a_checkpoint(env, ds_ops, tmp_path):
    proc = launch("python", [*BASE, "train.max_steps=100000", "train.time_limit_minutes=0.1", f"run.dir={tmp_path}"], env)
    assert_ok(proc)
    assert "train.time_limit_minutes is nearly up" in proc.stdout
    state = json.loads((tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text().strip()
                        / "state.json").read_text())
    assert 0 < state["step"] < 100000 and state["elapsed_s"] < 6


def test_time_kept_for_one_more_step_leaves_out_the_compiling_step():
    from dist_lm.train.preemption import seconds_to_keep

    # a compiled run: 200 s for the first step (compiling), then about 1 s a step; 5 s a save
    steps = [200.0, 1.0, 1.2, 0.9]
    assert seconds_to_keep(steps, 5.0, 0.0) == pytest.approx(2 * 1.1 + 2 * 5.0)
    assert seconds_to_keep(steps, 5.0, 30.0) == pytest.approx(2 * 1.1 + 2 * 5.0 + 30.0)  # an evaluation is due
    assert seconds_to_keep([], 0.0, 0.0) == 0.0


@pytest.mark.parametrize("template", ["torchrun.sh", "deepspeed.sh"])
def test_sigusr1_to_one_rank_checkpoints_all_and_asks_for_a_requeue(env, ds_ops, tmp_path, template):
    """The launch templates exit 75 ("run me again"): torchrun alone would exit 1 and the deepspeed
    launcher would kill the other rank, so the status comes back through launchers/exit_status.sh."""
    args = [*BASE, "train.max_steps=100000", "parallel.zero_stage=2", f"run.dir={tmp_path}"]
    job = subprocess.Popen([str(ROOT / "launchers" / template), *args], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True,
                           env={**env, "PYTHON": sys.executable, "NPROC_PER_NODE": "2", "GPUS_PER_NODE": "2",
                                "MASTER_PORT": str(free_port())})
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until it trains
            if (tmp_path / "metrics.jsonl").is_file() and len((tmp_path / "metrics.jsonl").read_text().splitlines()) >= 2:
                break
            time.sleep(0.5)
        workers = [p for p in psutil.Process(job.pid).children(recursive=True)
                   if any(part.endswith("pretrain.py") for part in p.cmdline()[1:3])]  # python [-u] pretrain.py
        assert len(workers) == 2
        status_file = Path(workers[0].environ()["DIST_LM_STATUS_FILE"])
        assert status_file.is_file()
        max(workers, key=lambda p: p.pid).send_signal(signal.SIGUSR1)  # one rank only
        out, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == Exit.REQUEUE, err[-3000:]
    assert not status_file.exists()  # the template removed its status file
    assert "stopping after step" in out and ("received SIGUSR1" in out or "a signal to another rank" in out)
    stopped = int(out.split("stopping after step ")[1].split()[0])
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step{stopped:08d}"

    if template != "torchrun.sh":
        return
    proc = launch("torchrun", [*BASE, f"train.max_steps={stopped + 2}", "parallel.zero_stage=2", f"run.dir={tmp_path}"], env)
    assert_ok(proc)
    assert f"at step {stopped} " in proc.stdout
    assert [r["step"] for r in read_metrics(tmp_path)[0]][-2:] == [stopped + 1, stopped + 2]
