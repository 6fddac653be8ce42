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

from conftest import ROOT, assert_ok, free_port, launch, read_metrics, start_training, start_two_ranks
from dist_lm.train.exits import Exit

BASE = ["--config", "debug", "train.log_interval=1", "train.eval_interval=0", "logging.wandb=disabled"]


def test_stop_at_step_then_continue_equals_an_uninterrupted_run(env, ds_ops, tmp_path):
    """Stopped at step 3, in the middle of a logging window of 2: the row of step 4 averages steps
    3 and 4 in both runs, to the bit (the checkpoint keeps the window's sums). The stopped run had
    no name: its default one (the start time) is not in the command, so the line that ends it
    names it, and the command with that run.name continues it."""
    whole, here = tmp_path / "whole", tmp_path / "project"
    here.mkdir()
    args = [*BASE, "train.max_steps=6", "train.log_interval=2"]
    assert_ok(launch("python", [*args, f"run.dir={whole}"], env))
    proc = launch("python", [*args, "train.stop_at_step=3"], env, cwd=here)
    assert_ok(proc)
    stop_line = next(line for line in proc.stdout.splitlines() if "stopping after step 3 of 6" in line)
    assert "train.stop_at_step=3; run the same command with run.name=debug-" in stop_line, stop_line
    name = stop_line.split("run.name=")[1].split()[0]
    split = here / "runs" / name
    assert (split / "checkpoints" / "latest").read_text().strip() == "step00000003"
    assert_ok(launch("python", [*args, f"run.name={name}"], env, cwd=here))
    expected = [r["loss"] for r in read_metrics(whole)[0]]
    got = [r["loss"] for r in read_metrics(split)[0]]
    assert [r["step"] for r in read_metrics(split)[0]] == [2, 4, 6]
    assert got == expected
    proc = launch("python", [*args, f"run.name={name}"], env, cwd=here)  # a finished run has nothing left to do
    assert_ok(proc)
    assert "nothing to do: the run is already at step 6" in proc.stdout


def test_time_limit_stops_with_a_checkpoint(env, ds_ops, tmp_path):
    proc = launch(
        "python", [*BASE, "train.max_steps=100000", "train.time_limit_minutes=0.1", f"run.dir={tmp_path}"], env
    )
    assert_ok(proc)
    assert "train.time_limit_minutes is nearly up" in proc.stdout
    state = json.loads(
        (
            tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text().strip() / "state.json"
        ).read_text()
    )
    assert 0 < state["step"] < 100000  # the time limit, not max_steps, ended it (how soon is the machine's)


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
    job = subprocess.Popen(
        [str(ROOT / "launchers" / template), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={
            **env,
            "PYTHON": sys.executable,
            "NPROC_PER_NODE": "2",
            "GPUS_PER_NODE": "2",
            "MASTER_PORT": str(free_port()),
        },
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until it trains
            if (tmp_path / "metrics.jsonl").is_file() and len(
                (tmp_path / "metrics.jsonl").read_text().splitlines()
            ) >= 2:
                break
            time.sleep(0.5)
        workers = [
            p
            for p in psutil.Process(job.pid).children(recursive=True)
            if any(part.endswith("pretrain.py") for part in p.cmdline()[1:3])
        ]  # python [-u] pretrain.py
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
    proc = launch(
        "torchrun", [*BASE, f"train.max_steps={stopped + 2}", "parallel.zero_stage=2", f"run.dir={tmp_path}"], env
    )
    assert_ok(proc)
    assert f"at step {stopped} " in proc.stdout
    assert [r["step"] for r in read_metrics(tmp_path)[0]][-2:] == [stopped + 1, stopped + 2]


def _wait_for_rows(run: Path, rows: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= rows:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {rows} rows in {run}: {proc.communicate()}")


def test_ctrl_c_checkpoints_like_sigterm_and_continues(env, ds_ops, tmp_path):
    """The first SIGINT (Ctrl-C) ended in a KeyboardInterrupt traceback with no checkpoint. Now it
    stops after the step with a checkpoint, as SIGTERM does (exit 130, no error line), and the same
    command continues from it."""
    run = tmp_path / "run"
    args = [*BASE, "train.max_steps=100000", "checkpoint.interval=0", f"run.dir={run}"]
    proc = start_training(args, env)
    _wait_for_rows(run, 3, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == Exit.INTERRUPTED and "Traceback" not in err and "error" not in err, err[-3000:]
    assert "received SIGINT; run the same command again to continue from it" in out  # run.dir names the run
    stopped = (run / "checkpoints" / "latest").read_text().strip()
    proc = start_training([*args, "train.max_steps=" + str(int(stopped[4:]) + 2)], env)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and f"resumed from {run / 'checkpoints' / stopped}" in out, err[-3000:]


def test_a_second_ctrl_c_ends_at_once_even_in_a_collective_and_leaves_nothing_half_written(env, ds_ops, tmp_path):
    """Two ranks started by hand; rank 1 is frozen (SIGSTOP) in the middle of a save, so rank 0
    waits in a collective, where a Python signal handler does not run. Two Ctrl-Cs to rank 0 end it
    at once (the signal-pipe thread): one line, exit 130, and the checkpoint it was writing is
    removed rather than left half-written (before, an empty step directory stayed)."""
    from dist_lm.store import checkpoints

    run = tmp_path / "run"
    args = [*BASE, "train.max_steps=100000", "checkpoint.interval=1", f"run.dir={run}"]
    procs = start_two_ranks(args, env)
    try:
        _wait_for_rows(run, 3, procs[0])
        seen = {p.name for p in (run / "checkpoints").iterdir()}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not {p.name for p in (run / "checkpoints").iterdir()} - seen:
            time.sleep(0.005)  # a new step directory: a save has begun
        procs[1].send_signal(signal.SIGSTOP)
        procs[0].send_signal(signal.SIGINT)
        time.sleep(0.7)
        procs[0].send_signal(signal.SIGINT)
        out, err = procs[0].communicate(timeout=30)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    lines = [line for line in err.splitlines() if line.strip()]
    assert procs[0].returncode == Exit.INTERRUPTED and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: interrupted again (Ctrl-C twice): stopped at once")
    assert lines[0].endswith("which is kept; run the same command again to continue from it"), lines[0]
    steps = [p for p in (run / "checkpoints").iterdir() if checkpoints.step_of(p) is not None]
    assert steps and all(checkpoints.problem_with(p) is None for p in steps), [
        checkpoints.problem_with(p) for p in steps
    ]
