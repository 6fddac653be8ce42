"""On a machine with two CUDA GPUs (`pytest -m gpu2`): what the CPU suite checks with gloo, under
NCCL (issue 22). A bf16 run stopped on two GPUs resumes on one and on two; a stopped rank ends
the other within its timeout; fp8 trains on two GPUs; sequence and tensor parallelism follow one GPU.
Deselected by default (pyproject's addopts); the scaling figures are tools/bench_session.sh's
multi-GPU parts, not tests."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_ok, assert_one_hang_line, launch, read_metrics, stop_one_of_two_ranks
from dist_lm.observe.sinks import read_sample_log
from dist_lm.train.exits import Exit

pytestmark = pytest.mark.gpu2

BASE = ["--config", "debug", "train.log_interval=1", "train.eval_interval=0", "logging.wandb=disabled"]


@pytest.fixture(autouse=True)
def needs_two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.fail(f"the two-GPU tests were selected (-m gpu2) on a machine with {torch.cuda.device_count()} GPUs")


@pytest.fixture
def gpu_env(env):
    return {**env, "DS_ACCELERATOR": "cuda"}


def tool(args: list, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "dist_lm", *map(str, args)], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_a_bf16_run_stopped_on_two_gpus_resumes_on_one_and_two(gpu_env, tmp_path):
    """bf16 at ZeRO-1, the GPU default: the uninterrupted two-GPU run's checkpoint at step 3,
    resumed on one GPU (DeepSpeed's universal format) and on two. The samples continue exactly;
    the losses match within 2e-3 (bf16 reductions in another order, as the bf16 GPU lifecycle test
    allows); evaluate and export read every resulting checkpoint."""
    args = [
        *BASE,
        "parallel.precision=bf16",
        "parallel.zero_stage=1",
        "train.micro_batch_size=2",
        "train.global_batch_size=8",
        "data.log_samples=true",
        "train.max_steps=6",
    ]
    whole = tmp_path / "whole"
    assert_ok(launch("torchrun", [*args, "checkpoint.interval=3", f"run.dir={whole}"], gpu_env))
    expected = {r["step"]: r["loss"] for r in read_metrics(whole)[0] if r["step"] > 3}
    expected_samples = sorted(
        i for f in (whole / "samples").iterdir() for step, ids in read_sample_log(f).items() if step > 3 for i in ids
    )
    step3 = whole / "checkpoints" / "step00000003"
    for gpus in (1, 2):
        run = tmp_path / f"on{gpus}"
        resumed = launch("torchrun", [*args, f"run.dir={run}", "--resume", str(step3)], gpu_env, nproc=gpus)
        assert_ok(resumed)
        assert f"resumed from {step3} at step 3 (24 samples consumed)" in resumed.stdout
        got = {r["step"]: r["loss"] for r in read_metrics(run)[0]}
        assert list(got) == [4, 5, 6]
        assert [got[s] for s in got] == pytest.approx([expected[s] for s in got], abs=2e-3)
        samples = sorted(i for f in (run / "samples").iterdir() for ids in read_sample_log(f).values() for i in ids)
        assert samples == expected_samples
        evaluated = json.loads(tool(["evaluate", run, "--samples", "16", "--json"], gpu_env).stdout.splitlines()[-1])
        assert evaluated["checkpoint"].endswith("step00000006")
        tool(["export", run, tmp_path / f"hf{gpus}"], gpu_env)
        assert (tmp_path / f"hf{gpus}" / "model.safetensors").is_file()


def test_a_stopped_rank_under_nccl_ends_the_other_within_its_timeout(gpu_env, tmp_path):
    """SIGSTOP one of two ranks: the other ends within parallel.timeout_minutes plus a minute,
    with one line naming the stopped rank, and the exit status of a hang."""
    rank0, pid1, _ = stop_one_of_two_ranks(
        [*BASE, "train.max_steps=100000", "parallel.timeout_minutes=0.5", f"run.dir={tmp_path}"], gpu_env, tmp_path
    )
    assert rank0.returncode == Exit.HANG, rank0.stderr[-3000:]  # (bounded: the helper waits 300 s at most)
    assert_one_hang_line(rank0.stderr, pid1, 0.5)


def test_fp8_trains_on_two_gpus(gpu_env, tmp_path):
    args = [
        *BASE,
        "parallel.precision=fp8",
        "parallel.zero_stage=1",
        "parallel.compile=true",
        "train.max_steps=8",
        f"run.dir={tmp_path}",
    ]
    proc = launch("torchrun", args, gpu_env, timeout=600)
    assert_ok(proc)
    assert "fp8: 14 linear layers of the blocks multiply in float8" in proc.stdout
    train = read_metrics(tmp_path)[0]
    assert [r["step"] for r in train] == list(range(1, 9)) and train[-1]["loss"] < train[0]["loss"]


@pytest.mark.parametrize(
    "kind,stage,compiled",
    [("sequence", 1, False), ("sequence", 3, False), ("sequence", 1, True), ("tensor", 1, False), ("tensor", 3, False)],
)
def test_split_layouts_on_two_gpus_follow_one_gpu(gpu_env, tmp_path, kind, stage, compiled):
    """DeepSpeed's Ulysses (each window split over the two GPUs, compiled too: the all-to-all
    inside the compiled blocks) and AutoTP (each linear layer split) under NCCL, bf16 at ZeRO-1
    and -3: one GPU's losses on the same global batch within bf16's 2e-3, at a window long
    enough for the flash kernels (2048)."""
    args = [
        *BASE,
        "parallel.precision=bf16",
        f"parallel.zero_stage={stage}",
        f"parallel.compile={str(compiled).lower()}",
        "model.seq_len=2048",
        "train.micro_batch_size=2",
        "train.global_batch_size=8",
        "train.max_steps=6",
    ]
    one, split = tmp_path / "one", tmp_path / "split"
    assert_ok(launch("torchrun", [*args, f"run.dir={one}"], gpu_env, nproc=1, timeout=600))
    proc = launch("torchrun", [*args, f"parallel.{kind}_parallel_size=2", f"run.dir={split}"], gpu_env, timeout=600)
    assert_ok(proc)
    assert f"1 data x 2 {kind} parallel" in proc.stdout
    expected = [r["loss"] for r in read_metrics(one)[0]]
    assert [r["loss"] for r in read_metrics(split)[0]] == pytest.approx(expected, abs=2e-3)
