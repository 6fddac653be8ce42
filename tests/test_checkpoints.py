"""Checkpoints and resuming, with real processes: resuming a two-rank ZeRO-3 run on one and two
ranks, a hung or dead rank, a truncated checkpoint, numerical faults, data changes, disk
problems. (kill -9 and resuming, many times over: tests/test_chaos.py.)"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (
    PRETRAIN,
    ROOT,
    assert_ok,
    assert_one_hang_line,
    fill,
    launch,
    read_metrics,
    start_training,
    stop_one_of_two_ranks,
)
from dist_lm.observe.sinks import read_sample_log
from dist_lm.store import checkpoints
from dist_lm.train import checkpoint
from dist_lm.train.exits import Exit

BASE = ["--config", "debug", "train.log_interval=1", "train.eval_interval=0", "logging.wandb=disabled"]


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run)[0]]


def steps_of(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step"))


def bad(proc: subprocess.CompletedProcess, status: int = 2) -> str:
    assert proc.returncode == status, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.parametrize("stage", [3])  # ZeRO-2 at two ranks: tests/test_chaos.py, many times
def test_two_rank_zero_checkpoint_resumes_on_one_and_two_ranks(env, ds_ops, tmp_path, stage):
    """Same world size: DeepSpeed's own files. One rank: through DeepSpeed's universal format.
    Tolerance 1e-4 in loss, as for any ZeRO run against the reference; except ZeRO-3 through the
    universal format, where DeepSpeed 0.19.8's loader continued 2.5e-3 off by the third step
    (docs/checkpoints.md), so 1e-2 there."""
    args = [
        *BASE,
        f"parallel.zero_stage={stage}",
        "train.micro_batch_size=2",
        "train.global_batch_size=8",
        "data.log_samples=true",
    ]
    whole = tmp_path / "whole"  # uninterrupted, with the checkpoint at step 3 that the others resume from
    assert_ok(launch("torchrun", [*args, "train.max_steps=6", "checkpoint.interval=3", f"run.dir={whole}"], env))
    expected = [v for s, v in losses(whole) if s > 3]
    expected_samples = sorted(
        i for f in (whole / "samples").iterdir() for step, ids in read_sample_log(f).items() if step > 3 for i in ids
    )
    for ranks in (1,):  # on 2 ranks again: tests/test_chaos.py (ZeRO-2), many times over
        run = tmp_path / f"on{ranks}"
        step3 = whole / "checkpoints" / "step00000003"
        resumed = launch(
            "torchrun", [*args, "train.max_steps=6", f"run.dir={run}", "--resume", str(step3)], env, nproc=ranks
        )
        assert_ok(resumed)
        assert f"resumed from {step3} at step 3 (24 samples consumed)" in resumed.stdout
        assert ("universal format (saved on 2 ranks" in resumed.stdout) == (ranks == 1)
        got = losses(run)
        assert [s for s, _ in got] == [4, 5, 6]
        assert [v for _, v in got] == pytest.approx(expected, abs=1e-2 if stage == 3 and ranks == 1 else 1e-4)
        samples = sorted(i for f in (run / "samples").iterdir() for ids in read_sample_log(f).values() for i in ids)
        assert samples == expected_samples  # the data continues exactly, whatever the rank count


def test_a_hung_rank_ends_the_other_with_one_line_naming_it(env, ds_ops, tmp_path):
    """Two ranks started by hand (RANK, WORLD_SIZE, ... in the environment: no launcher to end the
    others); rank 1 is stopped (SIGSTOP: its process lives on, its collectives never come). Rank 0
    ends within the timeout plus the watchdog's margins, with one line naming rank 1. (A dead rank,
    SIGKILL, is tests/test_chaos.py's "kill-one": the survivor's one line is checked there.)"""
    rank0, pid1, _ = stop_one_of_two_ranks(
        [*BASE, "train.max_steps=100000", "parallel.timeout_minutes=0.25", f"run.dir={tmp_path}"], env, tmp_path
    )
    out, err = rank0.stdout, rank0.stderr
    assert rank0.returncode == Exit.HANG, err[-3000:]  # (bounded: the helper waits 300 s at most)
    assert "launcher=env world_size=2" in out
    assert_one_hang_line(err, pid1, 0.25)


def test_a_truncated_latest_checkpoint_is_skipped_with_a_note(env, ds_ops, tmp_path):
    args = [*BASE, "train.max_steps=4", "checkpoint.interval=2", f"run.dir={tmp_path}"]
    first_save_died = tmp_path / "checkpoints" / "step00000001"  # a run killed while saving its first checkpoint
    first_save_died.mkdir(parents=True)
    (tmp_path / ".lock").touch()  # which that run took before it wrote anything
    (first_save_died / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 500)
    first = launch("python", args, env)
    assert_ok(first)
    assert (
        "step00000001 is incomplete (it has no state.json (the save did not finish)); no complete checkpoint "
        "to resume: training from step 0" in first.stderr
    )
    assert not first_save_died.exists()  # removed once a complete checkpoint is newer
    latest = tmp_path / "checkpoints" / "step00000004"
    shard = latest / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:1000])
    died = tmp_path / "checkpoints" / "step00000005"  # what a kill -9 in the middle of a save leaves
    died.mkdir()
    (died / "mp_rank_00_model_states.pt").write_bytes(shard.read_bytes()[:500])
    proc = launch("python", [*BASE, "train.max_steps=6", "checkpoint.interval=2", f"run.dir={tmp_path}"], env)
    assert_ok(proc)
    assert (
        "step00000005 is incomplete (it has no state.json (the save did not finish)); step00000004 is "
        "incomplete (mp_rank_00_model_states.pt has 1000 bytes" in proc.stderr
    )
    assert "resuming from step00000002, the newest complete checkpoint" in proc.stderr
    assert "at step 2 " in proc.stdout and [s for s, _ in losses(tmp_path)][-4:] == [3, 4, 5, 6]
    shard.write_bytes(shard.read_bytes()[:1000])  # (step 4 was saved again by the resumed run)
    table = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "list_runs.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "step00000004 INCOMPLETE" in table and "step00000006 (latest)" in table


def test_save_at_end_false_still_saves_at_a_stop(env, ds_ops, tmp_path):
    args = [*BASE, "train.max_steps=4", "checkpoint.interval=0", "checkpoint.save_at_end=false", f"run.dir={tmp_path}"]
    assert_ok(launch("python", [*args, "train.stop_at_step=2"], env))
    assert steps_of(tmp_path) == ["step00000002"]  # a stop on purpose saves, so the run can go on
    proc = launch("python", args, env)
    assert_ok(proc)
    assert "at step 2 " in proc.stdout and [s for s, _ in losses(tmp_path)] == [1, 2, 3, 4]
    assert steps_of(tmp_path) == ["step00000002"]  # no end-of-run checkpoint


def test_keep_last_and_best(env, ds_ops, tmp_path):
    proc = launch(
        "python",
        [
            *BASE,
            "train.max_steps=8",
            "checkpoint.interval=1",
            "checkpoint.keep_last=2",
            "train.eval_interval=1",
            "train.eval_samples=8",
            f"run.dir={tmp_path}",
        ],
        env,
    )
    assert_ok(proc)
    evals = {r["step"]: r["val_loss"] for r in read_metrics(tmp_path)[1]}
    best = min(evals, key=evals.get)
    assert steps_of(tmp_path) == sorted({f"step{best:08d}", "step00000007", "step00000008"})
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step00000008"
    listed = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "list_runs.py"), str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = {r["checkpoint"]: r for r in map(json.loads, listed.splitlines())}
    assert sorted(rows) == steps_of(tmp_path) and rows["step00000008"]["latest"]
    assert rows["step00000008"]["val_loss"] == pytest.approx(evals[8]) and rows["step00000008"]["tokens"] == 8 * 8 * 128
    assert rows["step00000008"]["parameters"] > 1e6 and rows["step00000008"]["bytes"] > 1e6


def test_nonfinite_updates_are_skipped_then_the_run_stops(env, ds_ops, tmp_path):
    for stage in (0, 2):
        run = tmp_path / f"stage{stage}"
        common = [*BASE, f"parallel.zero_stage={stage}", f"run.dir={run}"]
        assert_ok(launch("python", [*common, "train.max_steps=2"], env))
        # lr 1e30: the first update throws the weights out of fp32's range; the losses after are NaN
        # a checkpoint every step: none is written while updates are being skipped
        proc = launch(
            "python",
            [
                *common,
                "train.max_steps=20",
                "optim.lr=1e30",
                "optim.warmup_steps=0",
                "optim.grad_clip=0",
                "train.max_skipped_steps=3",
                "checkpoint.interval=1",
            ],
            env,
        )
        err = bad(proc, 1)
        assert "update skipped" in err and "3 in a row" in err
        first = int(err.split("from step ")[1].split(";")[0])  # step 3 or 4: the update of 3 sends the loss to NaN
        assert (
            f"3 updates in a row were skipped for NaN/inf gradients (train.max_skipped_steps) from step {first}; "
            f"the last good checkpoint is {run / 'checkpoints' / f'step{first - 1:08d}'}" in err
        )
        assert (run / "checkpoints" / "latest").read_text() == f"step{first - 1:08d}"  # the last good one
        assert checkpoints.problem_with(run / "checkpoints" / "step00000002") is None


def test_loss_spike_guard_logs_the_samples(env, ds_ops, tmp_path):
    # A learning rate of ~0 keeps the loss flat, so micro-batches 0.1% above the running mean come up.
    proc = launch(
        "python",
        [
            *BASE,
            "train.max_steps=30",
            "train.spike_factor=1.001",
            "train.spike_skip=true",
            "optim.lr=1e-9",
            "optim.min_lr=0",
            f"run.dir={tmp_path}",
        ],
        env,
    )
    assert_ok(proc)
    spikes = [json.loads(line) for line in (tmp_path / "spikes.jsonl").read_text().splitlines()]
    assert spikes and all(len(s["sample_ids"]) == 4 and s["loss"] > 1.001 * s["running_mean"] for s in spikes)
    assert f"loss spike {spikes[0]['loss']:.4f}" in proc.stderr and "; skipped" in proc.stderr


def test_resume_on_changed_data_is_refused_unless_allowed(env, ds_ops, tmp_path, cache_dir):
    data = tmp_path / "data"
    embedded = next(cache_dir.glob("embedded-*"))
    data.mkdir()
    for f in embedded.iterdir():
        (data / f.name).symlink_to(f)
    run = tmp_path / "run"
    assert_ok(launch("python", [*BASE, "train.max_steps=2", f"data.dir={data}", f"run.dir={run}"], env))
    # Another corpus, as far as the checkpoint can tell: the validation shard joins the training split.
    meta = json.loads((embedded / "meta.json").read_text())
    meta["splits"]["train"] = meta["splits"]["train"] + meta["splits"]["val"][:1]
    (data / "meta.json").unlink()
    (data / "meta.json").write_text(json.dumps(meta))
    args = [*BASE, "train.max_steps=3", f"data.dir={data}", f"run.dir={run}"]
    err = bad(launch("python", args, env))
    assert "step00000002 was trained on data" in err and "pass --allow-data-change" in err
    proc = launch("python", [*args, "--allow-data-change"], env)
    assert_ok(proc)
    assert "continuing as --allow-data-change asks" in proc.stderr and "at step 2 " in proc.stdout


def test_a_checkpoint_of_another_model_shape_is_refused_before_anything_is_written(env, ds_ops, tmp_path, cache_dir):
    """--allow-data-change onto data of another vocabulary size: one line naming the tensor and the
    setting, exit 2, and the run directory as it was (its config.yaml describes the checkpoint)."""
    data = tmp_path / "data"
    embedded = next(cache_dir.glob("embedded-*"))
    data.mkdir()
    for f in embedded.iterdir():
        if f.name != "meta.json":
            (data / f.name).symlink_to(f)
    meta = json.loads((embedded / "meta.json").read_text())
    run = tmp_path / "run"
    assert_ok(launch("python", [*BASE, "train.max_steps=2", f"run.dir={run}"], env))
    (data / "meta.json").write_text(json.dumps({**meta, "vocab_size": 2 * meta["vocab_size"]}))
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}
    err = bad(
        launch("python", [*BASE, "train.max_steps=3", f"data.dir={data}", f"run.dir={run}", "--allow-data-change"], env)
    )
    assert (
        f"holds another model: tok_embeddings.weight is ({meta['vocab_size']}, 128) there and "
        f"({2 * meta['vocab_size']}, 128) here (model.vocab_size {meta['vocab_size']} -> {2 * meta['vocab_size']})"
        in err
    )
    assert err.strip().splitlines()[-1].startswith("error: config error: ")  # after the data-change warning
    assert {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()} == before


def test_resume_none_refuses_to_mix_with_an_earlier_run(env, ds_ops, tmp_path):
    assert_ok(launch("python", [*BASE, "train.max_steps=2", f"run.dir={tmp_path}"], env))
    err = bad(launch("python", [*BASE, "train.max_steps=2", f"run.dir={tmp_path}", "--resume", "none"], env))
    assert "checkpoint.resume=none but" in err and "holds checkpoints of an earlier run" in err


def test_unwritable_checkpoint_dir_fails_the_save_clearly(env, ds_ops, tmp_path):
    """Found at start-up, before any step is trained or the run directory is written."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = launch(
        "python", [*BASE, "train.max_steps=2", f"checkpoint.dir={blocker / 'ckpt'}", f"run.dir={tmp_path / 'run'}"], env
    )
    err = bad(proc)
    assert f"checkpoint error: at start-up: {blocker / 'ckpt'} is not writable" in err and "set checkpoint.dir" in err
    assert not (tmp_path / "run").exists()


def test_full_disk_names_the_path_and_the_bytes(tmp_path):
    problem = checkpoint.check_room(tmp_path, 10**18)
    assert problem.startswith(f"not enough space in {tmp_path}: a checkpoint needs about 1000000000.00 GB")
    assert "GB are free" in problem and checkpoint.check_room(tmp_path, 1) is None


def test_a_hung_save_is_reported_and_ends_the_process(tmp_path):
    code = (
        "import time; from dist_lm.train import watchdog\n"
        "w = watchdog.start(3, 1, '127.0.0.1', 0, 600)\n"
        "w.progress('saving checkpoint /ckpt/step00000007', 3, 'checkpoint.save_timeout_minutes')\n"
        "time.sleep(30)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert proc.returncode == Exit.HANG  # before the 30 s sleep ended, which exits 0
    assert proc.stderr.startswith(
        "error: rank 3: no progress for 0.05 minutes (checkpoint.save_timeout_minutes) "
        "while saving checkpoint /ckpt/step00000007; exiting with status 3."
    ), proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: run the suite as root, as CI does")
def test_a_disk_that_fills_during_a_save_keeps_the_previous_checkpoint(env, ds_ops, tmp_path, small_disk):
    """The disk runs out (of inodes: a tmpfs that has room for the step-2 checkpoint and two more
    files) in the middle of the step-4 save. Torch's writer fails with a RuntimeError, not an
    OSError; whatever fails, the partial checkpoint goes, the previous one stays the latest, and
    the run ends with one line and exit status 2."""
    args = [*BASE, "checkpoint.interval=2", f"checkpoint.dir={small_disk / 'ckpt'}", f"run.dir={tmp_path / 'run'}"]
    assert_ok(launch("python", [*args, "train.max_steps=2"], env))
    used = os.statvfs(small_disk).f_files - os.statvfs(small_disk).f_ffree
    subprocess.run(["mount", "-o", f"remount,nr_inodes={used + 2}", str(small_disk)], check=True)
    err = bad(launch("python", [*args, "train.max_steps=4"], env))
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(f"error: checkpoint error: rank 0: writing {small_disk / 'ckpt' / 'step00000004'} failed: ")
    ), err[-3000:]
    assert "Traceback" not in err
    assert sorted(p.name for p in (small_disk / "ckpt").iterdir() if p.name.startswith("step")) == ["step00000002"]
    assert (small_disk / "ckpt" / "latest").read_text() == "step00000002"
    assert checkpoints.problem_with(small_disk / "ckpt" / "step00000002") is None


def test_a_second_process_on_a_run_directory_is_refused_until_the_first_is_gone(env, ds_ops, tmp_path):
    """The first run holds RUN_DIR/.lock; a second start on the same directory gets one line and
    exit 2 and changes nothing; once the first is killed (-9: no clean-up), the directory is free."""
    args = [*BASE, f"run.dir={tmp_path}"]
    first = subprocess.Popen(
        [sys.executable, str(PRETRAIN), *args, "train.max_steps=100000"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "metrics.jsonl").is_file():
            time.sleep(0.1)
        config = (tmp_path / "config.yaml").read_bytes()
        second = launch("python", [*args, "train.max_steps=3", "model.n_layers=3"], env)
        err = bad(second)
        assert len(err.strip().splitlines()) == 1, err
        assert f"run error: {tmp_path} is in use by another run (pid@host {first.pid}@" in err
        assert (tmp_path / "config.yaml").read_bytes() == config  # still the first run's model
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
    assert_ok(launch("python", [*args, "train.max_steps=2"], env))


def test_state_json_is_versioned_and_reads_files_older_than_the_version(tmp_path):
    from dist_lm.config.schema import UserError
    from dist_lm.store.state import VERSION, RunState

    state = RunState(step=4, config={"model": {}}, data={"samples_consumed": 32}, precision="bf16", world_size=2)
    (tmp_path / "state.json").write_text(state.to_json())
    assert RunState.read(tmp_path) == state and json.loads(state.to_json())["version"] == VERSION
    # what a checkpoint written before state.json had a version holds: no version, no log window
    old = {
        "step": 4,
        "config": {},
        "data": {},
        "best_val_loss": None,
        "elapsed_s": 1.5,
        "evals_without_improvement": 0,
        "world_size": 1,
        "zero_stage": 1,
        "manifest": {"mp_rank_00_model_states.pt": 10},
        "an_old_key": 1,
    }
    (tmp_path / "state.json").write_text(json.dumps(old))
    read = RunState.read(tmp_path)
    assert (read.version, read.log_window, read.skipped_steps, read.precision) == (0, None, 0, "fp32")
    (tmp_path / "state.json").write_text(json.dumps({**old, "version": VERSION + 1}))
    with pytest.raises(UserError, match=f"is state version {VERSION + 1}, newer than this dist-lm reads"):
        RunState.read(tmp_path)
    assert "is unreadable" in checkpoints.problem_with(tmp_path)


def test_state_json_content_is_checked_like_any_input(tmp_path):
    """A state.json from elsewhere is data: a manifest naming files outside the checkpoint, a
    step that is not a count or an unknown precision make the checkpoint unreadable (one line),
    never a traceback further on. Its precisions are Precision's."""
    from dist_lm.runtime.precision import Precision
    from dist_lm.store.state import PRECISIONS, RunState

    assert sorted(PRECISIONS) == sorted(p.value for p in Precision)
    good = json.loads(RunState(step=4, config={}, data={}).to_json())
    for change, message in [
        ({"manifest": {"../../etc/passwd": 10}}, "manifest must map file names inside"),
        ({"step": "4"}, "step is '4'"),
        ({"precision": "fp4"}, "precision is 'fp4'"),
        ({"checksums": {"x.pt": "xxh3_128:00"}}, "checksums must map files of the manifest"),
        ({"zero_stage": 7}, "zero_stage is 7"),
    ]:
        (tmp_path / "state.json").write_text(json.dumps({**good, **change}))
        assert message in checkpoints.problem_with(tmp_path)


# --------------------------------------------------- one checkpoint.dir, one run (reliability #4)
def test_a_checkpoint_dir_belongs_to_one_run(env, ds_ops, tmp_path):
    """Two runs given one checkpoint.dir both saved into its stepNNNNNNNN directories, and a new run
    pointed at another run's checkpoint.dir "resumed" it and exited 0 without training. Now a
    checkpoint.dir outside the run directory is locked while a run saves there, and a run is
    refused one whose checkpoints are another run's: one line, exit 2, nothing written."""
    shared = tmp_path / "shared"
    args = [*BASE, f"checkpoint.dir={shared}"]
    first = subprocess.Popen(
        [
            sys.executable,
            str(PRETRAIN),
            *args,
            "train.max_steps=100000",
            "checkpoint.interval=0",
            "checkpoint.save_at_end=false",
            f"run.dir={tmp_path / 'a'}",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "a" / "metrics.jsonl").is_file():
            time.sleep(0.1)
        err = bad(launch("python", [*args, "train.max_steps=4", f"run.dir={tmp_path / 'b'}"], env))
        assert (
            len(err.strip().splitlines()) == 1
            and f"run error: {shared} is in use by another run (pid@host {first.pid}@" in err
            and "another checkpoint.dir" in err
        ), err
        assert first.poll() is None and not (tmp_path / "b").exists()
    finally:
        first.kill()
        first.wait()
    assert_ok(launch("python", [*args, "train.max_steps=4", "checkpoint.interval=2", f"run.dir={tmp_path / 'a'}"], env))
    newest = shared / "step00000004"
    before = {p: p.stat().st_mtime_ns for p in shared.rglob("*")}
    for other in (
        [*BASE, f"checkpoint.dir={shared}", f"run.dir={tmp_path / 'c'}"],  # a new run, auto-resume
        [*BASE, f"checkpoint.dir={shared}", f"run.dir={tmp_path / 'c'}", "checkpoint.resume=none"],
    ):
        err = bad(launch("python", [*other, "train.max_steps=100000"], env))
        assert (
            len(err.strip().splitlines()) == 1
            and f"holds the checkpoints of the run in {(tmp_path / 'a').resolve()}" in err
            and f"--resume {newest}" in err
        ), err
    assert {p: p.stat().st_mtime_ns for p in shared.rglob("*")} == before and not (tmp_path / "c").exists()
    proc = launch("python", [*args, "train.max_steps=5", f"run.dir={tmp_path / 'a'}"], env)  # the run itself
    assert_ok(proc)
    assert f"resumed from {newest}" in proc.stdout


# ------------------------------------------------ checkpoints checked by content (reliability #7)
def damage(path: Path) -> None:
    """4 KiB of random bytes in the middle of a file: the same size, other content."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = os.urandom(min(4096, len(data) - middle))
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_of_the_right_size_is_passed_over_by_resume_and_tools(env, ds_ops, tmp_path):
    """Only sizes were checked: 4 KiB of random bytes in the middle of the optimizer file gave nan
    losses and exit 0. The manifest records each file's checksum: a resume passes over to the
    previous complete checkpoint with one warning, as for a missing file; named explicitly, it
    is refused; a tool reading the weights passes over a damaged weights file the same way."""
    run = tmp_path / "run"
    args = [*BASE, "train.max_steps=4", "checkpoint.interval=2", "parallel.zero_stage=1", f"run.dir={run}"]
    assert_ok(launch("python", args, env))
    step4 = run / "checkpoints" / "step00000004"
    assert set(json.loads((step4 / "state.json").read_text())["checksums"]) == {
        p.name for p in step4.iterdir() if p.name != "state.json"
    }
    damage(step4 / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    explicit = launch(
        "python", [*args, "train.max_steps=6", f"run.dir={tmp_path / 'other'}", "--resume", str(step4)], env
    )
    assert (
        "zero_pp_rank_0_mp_rank_00_optim_states.pt does not match the checksum recorded when it was saved"
        in bad(explicit)
        and not (tmp_path / "other").exists()
    )
    proc = launch("python", [*args, "train.max_steps=6"], env)
    assert_ok(proc)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: step00000004 is damaged (zero_pp_rank_0_mp_rank_00_optim_states.pt does not match "
        "the checksum recorded when it was saved: it changed or is damaged); resuming from step00000002, the "
        "newest complete checkpoint"
    ], proc.stderr
    assert f"resumed from {run / 'checkpoints' / 'step00000002'} at step 2" in proc.stdout
    assert all(math.isfinite(loss) for _, loss in losses(run))

    damage(run / "checkpoints" / "step00000006" / "weights-rank00000.safetensors")
    tool = subprocess.run(
        [sys.executable, "-m", "dist_lm", "evaluate", str(run), "--json"],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert tool.returncode == 0 and "step00000006 is damaged (weights-rank00000.safetensors" in tool.stderr
    assert json.loads(tool.stdout)["checkpoint"].endswith("step00000004")
    tool = subprocess.run(
        [sys.executable, "-m", "dist_lm", "generate", str(run / "checkpoints" / "step00000006")],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert tool.returncode == 2 and len(tool.stderr.strip().splitlines()) == 1 and "does not match" in tool.stderr


# ------------------------------------------- the disk filling during training (reliability #14)
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: run the suite as root, as CI does")
def test_a_disk_that_fills_between_saves_ends_the_run_in_one_line_with_whole_metrics(env, ds_ops, tmp_path, small_disk):
    """The run directory's disk fills while training (not in a save): an OSError traceback at the
    next metrics write, and metrics.jsonl's last line cut short. Now one line and exit 2, every
    metrics file whole, the last checkpoint kept; with room again the same command continues."""
    run = small_disk / "run"
    args = [
        *BASE,
        "train.max_steps=100000",
        "checkpoint.interval=3",
        f"checkpoint.dir={tmp_path / 'ckpt'}",
        f"run.dir={run}",
    ]
    proc = start_training(args, env)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "ckpt" / "latest").is_file():
        time.sleep(0.05)
    filler = fill(small_disk)
    out, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, err[-3000:]
    assert (
        lines[0].startswith(f"error: run error: writing {run}/")
        and "failed (No space left on device) after step" in lines[0]
        and "the checkpoints so far are kept" in lines[0]
    ), lines
    for name in ("metrics.jsonl", "metrics.csv"):
        text = (run / name).read_text()
        assert text.endswith("\n")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    latest = (tmp_path / "ckpt" / "latest").read_text().strip()
    assert checkpoints.problem_with(tmp_path / "ckpt" / latest) is None
    filler.unlink()
    step = checkpoints.step_of(Path(latest))
    resumed = launch("python", [*args[:-2], f"train.max_steps={rows[-1]['step'] + 2}", *args[-2:]], env)
    assert_ok(resumed)
    assert f"resumed from {tmp_path / 'ckpt' / latest} at step {step}" in resumed.stdout
    assert [r["step"] for r in read_metrics(run)[0]] == list(range(1, rows[-1]["step"] + 3))


@pytest.mark.parametrize(
    "saved, wanted, converts",
    [
        ((2, 2), (1, 2), True),  # another rank count: the universal format
        ((2, 1), (2, 2), True),  # stage 1 <-> 2 (tested on CPU in bf16 both ways)
        ((2, 3), (1, 3), True),  # ZeRO-3 on fewer ranks: test_two_rank_zero_checkpoint_resumes_on_one_and_two_ranks
        ((2, 1), (2, 1), False),  # DeepSpeed's own files
        ((2, 1), (2, 3), "stage 1 and this run uses stage 3"),
        ((1, 3), (2, 2), "stage 3 and this run uses stage 2"),
        ((2, 0), (2, 1), "across stage 0 it cannot be converted"),
    ],
)
def test_which_layout_changes_go_through_the_universal_format(saved, wanted, converts):
    """Changes into or out of ZeRO-3 stopped in DeepSpeed 0.19.8's loader with a bare
    AssertionError (fp32 and bf16, on one rank and two): refused in one line instead."""
    from dist_lm.store.state import RunState
    from dist_lm.train.restore import needs_universal

    state = RunState(step=2, config={}, data={}, world_size=saved[0], zero_stage=saved[1])
    if isinstance(converts, str):
        with pytest.raises(checkpoints.CheckpointError, match=converts):
            needs_universal(state, *wanted)
    else:
        assert needs_universal(state, *wanted) is converts
