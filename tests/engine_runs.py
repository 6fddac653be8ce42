"""The engine tests' run: six steps of the debug preset on a global batch of 8, evaluated at
step 3 and the end on 7 windows, which the layouts split their own way and the plain-PyTorch
reference (tests/reference.py, the ``reference`` fixture of conftest) runs in one process."""

from __future__ import annotations

from conftest import assert_ok, launch, read_metrics

STEPS = 6
# 2 ranks x micro 2 x accumulation 2 = global batch 8; eval at step 3 and the end on 7 windows
# (split 4 + 3 over two ranks, so the padding forward of ZeRO-3 evaluation is exercised).
COMMON = [
    f"train.max_steps={STEPS}",
    "train.log_interval=1",
    "train.eval_interval=3",
    "train.eval_samples=7",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "optim.warmup_steps=2",
]

SEQUENCE_2 = "parallel.sequence_parallel_size=2"
TENSOR_2 = "parallel.tensor_parallel_size=2"
LAYOUTS = {"sequence": SEQUENCE_2, "tensor": TENSOR_2}


def run_and_read(tmp_path, launcher, extra, env, nproc=2):
    """Train COMMON under ``launcher`` in tmp_path/run; (the process, its losses, its validation losses)."""
    run_dir = tmp_path / "run"
    proc = launch(launcher, ["--config", "debug", *COMMON, *extra, f"run.dir={run_dir}"], env, nproc=nproc)
    assert_ok(proc)
    train, evals = read_metrics(run_dir)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["step"] for r in evals] == [3, 6]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step{STEPS:08d}"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "train.log").is_file()
    return proc, [r["loss"] for r in train], [r["val_loss"] for r in evals]
