"""bf16, the GPU default, on two sequence- and two tensor-parallel ranks at every ZeRO stage,
against one rank in the same precision and stage, and each layout's checkpoints resumed. (A file
of its own: pytest-xdist's --dist loadfile gives each file to one worker, and these runs are a
third of the layouts' time.) The split runs save with checkpoint.async_save: the bf16
checkpoints a thread writes, at every stage, resume like any other."""

from __future__ import annotations

import pytest
from engine_runs import COMMON, LAYOUTS

from conftest import assert_ok, launch, read_metrics


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_split_layouts_train_and_resume_at_every_zero_stage(tmp_path, env, ds_ops, stage):
    """bf16, the GPU default, at each ZeRO stage on two sequence- and two tensor-parallel ranks:
    one rank's course in the same precision and stage (bf16 at ZeRO-0 keeps no fp32 master
    weights, so the fp32 reference is not its course), and each step-2 checkpoint (bf16 weights,
    fp32 masters from stage 1; a tensor-parallel run's shards) resumes to the same losses."""
    args = ["--config", "debug", *COMMON, f"parallel.zero_stage={stage}", "parallel.precision=bf16"]
    args += ["train.stop_at_step=4", "train.eval_interval=0", "checkpoint.interval=2"]  # the 6-step schedule
    assert_ok(launch("python", [*args, f"run.dir={tmp_path / 'one'}"], env, nproc=1))
    expected = [r["loss"] for r in read_metrics(tmp_path / "one")[0]]
    for kind, layout in LAYOUTS.items():
        split, again = tmp_path / kind, tmp_path / f"{kind}-again"
        # saved by a thread while training goes on (checkpoint.async_save), resumed below
        assert_ok(launch("torchrun", [*args, layout, "checkpoint.async_save=true", f"run.dir={split}"], env))
        losses = [r["loss"] for r in read_metrics(split)[0]]
        assert losses == pytest.approx(expected, abs=2e-3), kind
        step2 = split / "checkpoints" / "step00000002"
        assert_ok(launch("torchrun", [*args, layout, f"run.dir={again}", "--resume", step2], env))
        train, _ = read_metrics(again)
        assert [r["step"] for r in train] == [3, 4]
        assert [r["loss"] for r in train] == pytest.approx(losses[2:], abs=1e-3), kind
