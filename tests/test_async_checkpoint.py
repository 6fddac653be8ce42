"""checkpoint.async_save (dist_lm.train.async_checkpoint): training goes on while a thread writes
the checkpoint, which becomes complete only once every rank's files are on disk; a kill during
the write resumes from the previous complete checkpoint bitwise; a disk that fills during it ends
the run with one line and leaves nothing half-written. The write is held back by
tests/hooks/sitecustomize.py, never timed. (bf16 at every ZeRO stage: the sequence- and
tensor-parallel runs of tests/test_parallel_layouts_bf16.py save this way and resume; and
tests/test_chaos.py saves this way at every other start.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest
from engine_runs import COMMON

from conftest import ROOT, assert_ok, fill, hooked, launch, log_order, read_metrics, start_training
from dist_lm.store import checkpoints

ASYNC = ["checkpoint.async_save=true", "checkpoint.interval=2"]


def torchrun(args: list[str], env: dict) -> subprocess.Popen:
    """Two ranks under torchrun, started in the background."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "dist_lm", "train", *args]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_training_goes_on_during_a_save_and_a_kill_in_it_resumes_from_the_last_complete_one(
    tmp_path, env, ds_ops, reference
):
    """Two ranks, fp32 ZeRO-1 (tests/test_chaos.py saves this way at ZeRO-2). Uninterrupted: the
    step-2 and step-4 saves are each held until two more steps are logged, so those steps ran
    while the files were pending; each checkpoint completes afterwards, and the losses are the
    reference's. Then kill -9 of every process while the
    step-4 save is pending (training at step 5): that directory never gets its state.json,
    ``latest`` stays at step 2, and the next start resumes there and ends with the uninterrupted
    run's losses, bit for bit. That start finds its node's memory short (the hook reports none
    available): each save writes its state in place, warns once, and completes as before."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    args = ["--config", "debug", *COMMON, *ASYNC, "parallel.zero_stage=1"]
    assert_ok(launch("torchrun", [*args, f"run.dir={whole}"], hooked(env, hold_saves="2=rows:4,4=rows:6")))
    train, _ = read_metrics(whole)
    assert [r["loss"] for r in train] == pytest.approx(reference, abs=1e-4)
    step2, step4 = (whole / "checkpoints" / f"step0000000{n}" for n in (2, 4))
    staged, row3, row4, saved = log_order(
        whole, f"staged checkpoint {step2}", "step      3 |", "step      4 |", f"saved checkpoint {step2} ("
    )
    assert staged < row3 < row4 < saved
    staged, row6, saved = log_order(whole, f"staged checkpoint {step4}", "step      6 |", f"saved checkpoint {step4} (")
    assert staged < row6 < saved
    root = whole / "checkpoints"
    assert (root / "latest").read_text() == "step00000006"
    assert all(checkpoints.problem_with(p) is None for p in root.iterdir() if checkpoints.step_of(p) is not None)

    proc = torchrun([*args, f"run.dir={killed}"], hooked(env, hold_saves="4=forever"))
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if (killed / "metrics.jsonl").is_file() and '"step": 5,' in (killed / "metrics.jsonl").read_text():
            break
        time.sleep(0.05)
    ranks = psutil.Process(proc.pid).children(recursive=True)  # torchrun puts them in groups of their own
    for p in [psutil.Process(proc.pid), *ranks]:
        p.kill()
    proc.wait(timeout=60)
    psutil.wait_procs(ranks, timeout=60)
    root = killed / "checkpoints"
    assert (root / "latest").read_text() == "step00000002"
    assert checkpoints.problem_with(root / "step00000004") is not None  # never complete
    resumed = launch("torchrun", [*args, f"run.dir={killed}"], hooked(env, host_available=0))
    assert_ok(resumed)
    assert f"resumed from {root / 'step00000002'} at step 2" in resumed.stdout
    short = [line for line in resumed.stderr.splitlines() if "checkpoint.async_save: rank 0 wrote" in line]
    assert len(short) == 2 and "of the node's memory free" in short[0], resumed.stderr[-3000:]
    assert all(checkpoints.problem_with(root / f"step0000000{n}") is None for n in (4, 6))
    losses = {r["step"]: r["loss"] for r in read_metrics(killed)[0]}
    assert [losses[s] for s in range(1, 7)] == [r["loss"] for r in train]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: run the suite as root, as CI does")
def test_a_disk_that_fills_during_the_background_write_is_one_line_and_leaves_nothing(
    env,
    ds_ops,
    tmp_path,
    small_disk,
):
    """fp32 ZeRO-3, one rank. The step-2 save is staged, training goes on, and the disk fills
    before the thread writes: the run ends with one line and exit 2 at the next step, the partial
    directory is gone, and no ``latest`` names it."""
    release = tmp_path / "release"
    ckpt = small_disk / "ckpt"
    args = ["--config", "debug", *ASYNC, "parallel.zero_stage=3", "train.log_interval=1", "train.eval_interval=0"]
    args += ["train.max_steps=100000"]
    args += [f"checkpoint.dir={ckpt}", f"run.dir={tmp_path / 'run'}"]
    proc = start_training(args, hooked(env, hold_saves=f"2=file:{release}"))
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and '"step": 3,' in metrics.read_text():
            break
        time.sleep(0.05)
    fill(small_disk)
    release.touch()
    _, err = proc.communicate(timeout=240)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"error: checkpoint error: rank 0: writing {ckpt / 'step00000002'} failed: "), lines
    assert "the previous complete checkpoint is intact" in lines[0]
    assert not [p for p in ckpt.iterdir() if checkpoints.step_of(p) is not None or p.name == "latest"]


def test_each_save_copies_into_the_host_buffers_of_the_last_and_counts_only_new_ones_against_the_reserve(
    tmp_path, monkeypatch
):
    """The staging engine (a unit, on DeepSpeed's own torch checkpoint engine): the second save of
    the same files copies into the buffers the first allocated, so that only new or reshaped
    tensors count against the node's memory reserve; each staged copy holds the values at its
    save, not the live tensors', and what is not a tensor stays as it was."""
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from dist_lm.runtime import engine

    asked: list[int] = []
    monkeypatch.setattr(engine, "host_memory_for", lambda nbytes: asked.append(nbytes) or True)
    staging = engine.StagingEngine(TorchCheckpointEngine(), ranks_per_node=2)
    live = {"module": {"w": torch.ones(4, 8), "b": torch.zeros(8, dtype=torch.bfloat16)}, "step": 7, "shapes": ["4x8"]}

    def stage(step: int) -> dict:
        staging.staged = []
        staging.save(live, str(tmp_path / f"step{step}" / "model_states.pt"))
        ((copy, path),) = staging.staged
        assert path.endswith(f"step{step}/model_states.pt") and copy["step"] == 7 and copy["shapes"] == ["4x8"]
        return copy

    first = stage(1)
    assert asked == [2 * (4 * 8 * 4 + 8 * 2)]  # every tensor new, for each of the node's two ranks
    live["module"]["w"].add_(1)
    assert torch.equal(first["module"]["w"], torch.ones(4, 8))  # a copy, not the live tensor
    second = stage(2)
    assert asked[-1] == 0
    assert second["module"]["w"] is first["module"]["w"] and torch.equal(second["module"]["w"], torch.full((4, 8), 2.0))
    assert second["module"]["b"].dtype == torch.bfloat16
    live["module"]["w"] = torch.ones(2, 8)  # a reshaped tensor: a buffer of its own, counted again
    third = stage(3)
    assert asked[-1] == 2 * 2 * 8 * 4 and third["module"]["w"].shape == (2, 8)
    assert third["module"]["b"] is first["module"]["b"]
    assert engine.tensor_bytes(staging.buffers.held) == 2 * 8 * 4 + 8 * 2
