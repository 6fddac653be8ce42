"""bf16, the GPU default, on two sequence- and two tensor-parallel ranks at every ZeRO stage,
against one bf16 rank, and each layout's checkpoints resumed. (A file
of its own: pytest-xdist's --dist loadfile gives each file to one worker, and these runs are a
third of the layouts' time.) The split runs save with checkpoint.async_save: the bf16
checkpoints a thread writes, at every stage, resume like any other, and so do those of which
the node's memory reserve had one file written in place."""

from __future__ import annotations

import psutil
import pytest
from engine_runs import COMMON, LAYOUTS

from conftest import assert_ok, hooked, launch, read_metrics
from dist_lm.runtime.hardware import HOST_MEMORY_RESERVE

BF16 = ["--config", "debug", *COMMON, "parallel.precision=bf16"]
BF16 += ["train.stop_at_step=4", "train.eval_interval=0", "checkpoint.interval=2"]  # the 6-step schedule


@pytest.fixture(scope="module")
def one_rank_courses() -> dict[int, list[float]]:
    """One bf16 rank's losses, by ZeRO stage, run when first asked for."""
    return {}


def one_rank_course(courses: dict[int, list[float]], stage: int, env: dict, tmp_path) -> list[float]:
    """bf16 at ZeRO-0 keeps no fp32 master weights: its own course. On one rank ZeRO 1-3 partition
    nothing, and their losses agreed to 5e-5 (the tolerance below is 2e-3): ZeRO-1's stands for
    all three."""
    stage = min(stage, 1)
    if stage not in courses:
        assert_ok(launch("python", [*BF16, f"parallel.zero_stage={stage}", f"run.dir={tmp_path / 'one'}"], env))
        courses[stage] = [r["loss"] for r in read_metrics(tmp_path / "one")[0]]
    return courses[stage]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_split_layouts_train_and_resume_at_every_zero_stage(tmp_path, env, ds_ops, one_rank_courses, stage):
    """bf16, the GPU default, at each ZeRO stage on two sequence- and two tensor-parallel ranks:
    one bf16 rank's course (the fp32 reference is not bf16's at ZeRO-0, which keeps no fp32
    master weights), and each step-2 checkpoint (bf16 weights, fp32 masters from stage 1; a
    tensor-parallel run's shards; the run's second save, copied into the first's host buffers)
    resumes to the same losses."""
    args = [*BF16, f"parallel.zero_stage={stage}"]
    expected = one_rank_course(one_rank_courses, stage, env, tmp_path)
    for kind, layout in LAYOUTS.items():
        split, again = tmp_path / kind, tmp_path / f"{kind}-again"
        # saved at every step by a thread while training goes on (checkpoint.async_save), so that
        # the step-2 checkpoint resumed below was copied into the host buffers of step 1's; on
        # sequence-parallel ranks with the node's memory reported short (10 MB above its
        # reserve): a mixed save at every stage, one state dict written in place and the other
        # staged (at ZeRO-1 each rank's optimizer partition, 17 MB for two ranks, in place; the
        # model states, 6 MB, staged)
        short = kind == "sequence"
        run_env = env
        if short:
            run_env = hooked(env, host_available=int(HOST_MEMORY_RESERVE * psutil.virtual_memory().total + 10e6))
        saving = ["checkpoint.async_save=true", "checkpoint.interval=1"]
        proc = launch("torchrun", [*args, layout, *saving, f"run.dir={split}"], run_env)
        assert_ok(proc)
        if short:
            warned = [line for line in proc.stderr.splitlines() if "checkpoint.async_save: rank 0 wrote 1 of" in line]
            assert len(warned) == 4, proc.stderr[-3000:]  # the saves at steps 1 to 4
        losses = [r["loss"] for r in read_metrics(split)[0]]
        assert losses == pytest.approx(expected, abs=2e-3), kind
        step2 = split / "checkpoints" / "step00000002"
        assert_ok(launch("torchrun", [*args, layout, f"run.dir={again}", "--resume", step2], env))
        train, _ = read_metrics(again)
        assert [r["step"] for r in train] == [3, 4]
        assert [r["loss"] for r in train] == pytest.approx(losses[2:], abs=1e-3), kind
