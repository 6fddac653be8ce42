"""The real DeepSpeed engine on CPU (gloo), started by real launchers, against a plain-PyTorch
reference of the same model on the same samples.

Tolerances: fp32 runs must match the reference within 1e-4 in loss per step (DeepSpeed reduces
gradients in another order than one process sums them; over 6 steps the difference seen is
~1e-6). bf16 runs within 0.01 (seen: 1e-3): bf16 keeps 8 bits of mantissa.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_runs import COMMON, STEPS, run_and_read

from conftest import (
    ROOT,
    age_file,
    assert_ok,
    assert_one_save_as_the_scaling_model_counts,
    hold_build_lock,
    launch,
    read_metrics,
)
from dist_lm.runtime import op_builds


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_torchrun_zero_stages_match_reference(tmp_path, env, ds_ops, reference, stage):
    proc, losses, _ = run_and_read(tmp_path, "torchrun", [f"parallel.zero_stage={stage}"], env)
    assert "launcher=torchrun world_size=2" in proc.stdout
    assert losses == pytest.approx(reference, abs=1e-4)
    assert losses[-1] < losses[0]
    assert_one_save_as_the_scaling_model_counts(tmp_path / "run" / "checkpoints" / f"step{STEPS:08d}")


def test_optimizer_offload_matches_reference(tmp_path, env, ds_ops, cpu_adam_op, reference):
    """DeepSpeed's CPU Adam with each rank bound to its own cores."""
    proc, losses, _ = run_and_read(
        tmp_path, "torchrun", ["parallel.zero_stage=2", "parallel.offload_optimizer=true"], env
    )
    assert "each rank is bound to its own 1 of this node's cores" in proc.stderr
    assert losses == pytest.approx(reference, abs=1e-4)


def test_activation_checkpointing_matches_reference(tmp_path, env, ds_ops, reference):
    _, losses, _ = run_and_read(
        tmp_path, "torchrun", ["parallel.zero_stage=2", "parallel.activation_checkpointing=true"], env
    )
    assert losses == pytest.approx(reference, abs=1e-4)


def test_four_ranks_match_the_reference_and_resume_as_two_by_two(tmp_path, env, ds_ops, reference):
    """The reference's global batch of 8 as micro 2 on each of four gloo ranks (no accumulation)
    gives its losses, evaluations split 2+2+2+1 included; its step-3 checkpoint resumes on the
    same four as 2 data x 2 sequence and as 2 data x 2 tensor parallel, on the same course. (On
    fewer ranks, through DeepSpeed's universal format: tests/test_checkpoints.py from two ranks to
    one, tests/test_parallel_layouts.py from 2 x 2 to 1 x 2.)"""
    proc, losses, _ = run_and_read(tmp_path, "torchrun", ["parallel.zero_stage=1", "checkpoint.interval=3"], env, 4)
    assert "world_size=4" in proc.stdout and "batch 8 = micro 2 x accum 1 x data-parallel ranks 4" in proc.stdout
    assert losses == pytest.approx(reference, abs=1e-4)
    step3 = tmp_path / "run" / "checkpoints" / "step00000003"
    args = ["--config", "debug", *COMMON, "parallel.zero_stage=1"]
    # as 2 data x 2 sequence parallel (the same ZeRO partitions: loaded as it is), and as 2 data x 2
    # tensor parallel (the layers split: through the universal format)
    for kind, universal in (("sequence", False), ("tensor", True)):
        split = tmp_path / kind
        layout = [*args, f"parallel.{kind}_parallel_size=2", f"run.dir={split}", "--resume", str(step3)]
        resumed = launch("torchrun", layout, env, nproc=4)
        assert_ok(resumed)
        assert f"2 data x 2 {kind} parallel" in resumed.stdout
        assert ("universal" in resumed.stdout) == universal
        train, _ = read_metrics(split)
        assert [r["step"] for r in train] == [4, 5, 6]
        assert [r["loss"] for r in train] == pytest.approx(reference[3:], abs=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero_plus_plus_hpz_on_two_nodes_of_two_matches_the_reference_and_resumes(
    tmp_path, env, ds_ops, reference, precision
):
    """ZeRO++ hpZ at ZeRO-3 on four gloo ranks as two "nodes" of two (zero_hpz_partition_size=2:
    backward gathers from the secondary copy within each pair): the reference's losses, as plain
    ZeRO-3 gives them (bf16, the GPU default, within bf16's tolerance); its step-3 checkpoint
    resumes on the same course and exports. (The quantized collectives, qwZ and qgZ, are CUDA
    kernels: refused on the CPU, tests/test_ds_config.py.)"""
    bf16 = precision == "bf16"
    hpz = ["parallel.zero_stage=3", "parallel.zero_hpz_partition_size=2", f"parallel.precision={precision}"]
    hpz.append("checkpoint.interval=3")
    proc, losses, _ = run_and_read(tmp_path, "torchrun", hpz, env, 4)
    assert "ZeRO++: hpZ, a secondary weight partition within groups of 2 ranks" in proc.stdout  # DeepSpeed's word
    assert f"precision {precision}" in proc.stdout
    assert losses == pytest.approx(reference, abs=0.01 if bf16 else 1e-4)
    step3, resumed_dir = tmp_path / "run" / "checkpoints" / "step00000003", tmp_path / "resumed"
    args = ["--config", "debug", *COMMON, *hpz, f"run.dir={resumed_dir}", "--resume", str(step3)]
    assert_ok(launch("torchrun", args, env, nproc=4))
    train, _ = read_metrics(resumed_dir)
    assert [r["step"] for r in train] == [4, 5, 6]
    assert [r["loss"] for r in train] == pytest.approx(losses[3:], abs=1e-3 if bf16 else 1e-5)
    from dist_lm.train import restore

    whole, resumed = (
        restore.consolidated_weights(d / "checkpoints" / "step00000006") for d in (tmp_path / "run", resumed_dir)
    )
    assert all(torch.allclose(whole[k], resumed[k], atol=1e-5) for k in whole)


def test_deepspeed_launcher_matches_reference(tmp_path, env, ds_ops, reference):
    """Also what runs before it left on the machine:
    - the launcher's LOCAL_SIZE puts DeepSpeed's shared-memory all-reduce in use, whose segments
      in /dev/shm (69 MB a rank) outlived every run until the ranks unlinked them
      (dist_lm.runtime.engine.unlink_shared_memory_segment);
    - the op's build directory holds the lock of a process killed while it loaded the op, on which
      torch would wait forever (dist_lm.runtime.op_builds). The directory is a copy of the one the
      suite built, in an extensions root of this test's own: the other tests never see the lock."""
    extensions = tmp_path / "torch_extensions"
    built = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm"  # by this venv: a copy needs no build
    shutil.copytree(built, extensions / built.name, ignore=shutil.ignore_patterns(op_builds.LOCK))
    lock = extensions / built.name / op_builds.LOCK
    holder = hold_build_lock(lock)
    holder.kill()
    holder.wait()
    age_file(lock, 2 * op_builds.LEFT_AFTER_S)  # left by an earlier run
    proc, losses, _ = run_and_read(
        tmp_path, "deepspeed", ["parallel.zero_stage=2"], {**env, "TORCH_EXTENSIONS_DIR": str(extensions)}
    )
    assert "launcher=deepspeed world_size=2" in proc.stdout
    assert losses == pytest.approx(reference, abs=1e-4)
    addr, port = re.search(r"master=(\S+):(\d+)", proc.stdout).groups()
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_*"))
    assert proc.stderr.count("warning: removed ") == 1 and f"warning: removed {lock}: " in proc.stderr
    assert not lock.exists()


def test_plain_python_one_process_matches_reference(tmp_path, env, ds_ops, reference):
    proc, losses, vals = run_and_read(tmp_path, "python", ["parallel.zero_stage=1"], env)
    assert "launcher=none world_size=1" in proc.stdout
    assert "batch 8 = micro 2 x accum 4 x data-parallel ranks 1" in proc.stdout
    assert losses == pytest.approx(reference, abs=1e-4)


def test_validation_loss_does_not_depend_on_rank_count(tmp_path, env, ds_ops):
    _, _, one = run_and_read(tmp_path / "one", "python", ["parallel.zero_stage=0"], env)
    _, _, two = run_and_read(tmp_path / "two", "torchrun", ["parallel.zero_stage=0"], env)
    assert one == pytest.approx(two, abs=1e-4)


# Trains the debug model 3 steps (accumulation 2) in one process, as dist_lm.runtime.engine.initialize
# sets it up or ("deepspeed") with DeepSpeed's own ways put back: its gradient all-reduce, and its
# bf16 accumulation at the end of backward (no immediate_grad_update). Prints whether initialize
# skipped that all-reduce, whether the model's gradients were kept after a micro-batch's backward,
# and a digest of the weights before and after.
ONE_RANK_RUN = r"""
import json, os, sys
import torch
from dist_lm.runtime import distributed, launch
from dist_lm.runtime import engine as engine_ops
from dist_lm.config.io import load_config
from dist_lm.config.batch import BatchSizes
from dist_lm.config.layout import ParallelLayout
from dist_lm.model.moe import build_model

stage, precision = int(sys.argv[1]), sys.argv[2]
cfg = load_config("debug", [f"parallel.zero_stage={stage}", "model.vocab_size=512"])
device = torch.device("cpu")
distributed.init_process_group(launch.detect(os.environ), device, 5)
if sys.argv[3] == "deepspeed":
    ours = engine_ops.deepspeed_config
    def deepspeeds_own(*args, **kwargs):
        config = ours(*args, **kwargs)
        config["bf16"]["immediate_grad_update"] = False
        return config
    engine_ops.deepspeed_config = deepspeeds_own
torch.manual_seed(0)
engine = engine_ops.initialize(build_model(cfg.model, cfg.parallel), cfg.parallel, cfg.optim,
                               BatchSizes(2, 2, 1), precision, device, ParallelLayout(1, 0))
skipped = not engine.enable_backward_allreduce
if sys.argv[3] == "deepspeed":
    engine.enable_backward_allreduce = True
    # DeepSpeed's default sends bf16 runs' gradients in bf16, rounding the fp32 accumulation;
    # in fp32 its path is the identity the skip relies on.
    engine.communication_data_type = torch.float32
digest = lambda: torch.cat([p.detach().float().flatten() for p in engine.module.parameters()])[::97].tolist()
before = digest()
data = torch.randint(0, 512, (3, 2, 2, cfg.model.seq_len + 1), generator=torch.Generator().manual_seed(1))
grads_kept = []
for step in data:
    for micro in step:
        engine.backward(engine(micro[:, :-1], micro[:, 1:]).total)
        grads_kept.append(any(p.grad is not None for p in engine.module.parameters()))
        engine.step()
print(json.dumps({"skipped": skipped, "grads_kept": grads_kept[0], "before": before, "after": digest()}))
"""


@pytest.mark.parametrize("stage,precision,skipped", [(1, "bf16", True), (2, "bf16", False)])
def test_one_rank_skips_deepspeeds_identity_allreduce(env, ds_ops, stage, precision, skipped):
    """Alone, DeepSpeed's BF16_Optimizer (and stage-0) gradient all-reduce is an identity through
    flattened copies (dist_lm.runtime.engine.reduces_for_nothing): skipped, the weights after 3 steps are
    bit for bit those of DeepSpeed's own path sending fp32 (by default it rounds bf16 runs'
    gradients to bf16 there, which the skip also spares), and so is adding each bf16 gradient to
    the fp32 buffer as backward makes it (immediate_grad_update, which frees the model's bf16
    gradients) rather than all at the end. Stages whose reduction moves the gradients into their
    partitions keep it. (One rank at stage 0 and at fp32 ZeRO-1, where the skip would lose the
    gradients, is checked against the reference and two ranks above.)"""

    def run(mode):
        proc = subprocess.run(
            [sys.executable, "-c", ONE_RANK_RUN, str(stage), precision, mode],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        assert_ok(proc)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    ours = run("ours")
    assert ours["skipped"] is skipped
    assert ours["after"] != ours["before"]
    if skipped:
        deepspeeds = run("deepspeed")
        assert not ours["grads_kept"] and deepspeeds["grads_kept"]
        assert ours["after"] == deepspeeds["after"]


def test_bench_runs_each_variant_at_each_rank_count(tmp_path, env, ds_ops):
    """tools/bench.py --ranks 1,2: the same micro-batches per rank, so twice the global batch on two
    ranks (torchrun; gloo here, NCCL on GPUs), and a scaling line per variant. No speed is
    asserted: the figures belong in docs/benchmarks.md."""
    rows_file = tmp_path / "rows.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "bench.py"),
            "--config",
            "debug",
            "--warmup",
            "1",
            "--steps",
            "2",
            "--accum",
            "2",
            "--ranks",
            "1,2",
            "--json",
            str(rows_file),
            "--variant",
            "zero1: parallel.zero_stage=1",
            "train.micro_batch_size=2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(rows_file.read_text())
    assert [(r["variant"], r["ranks"], r["global_batch"]) for r in rows] == [
        ("zero1, 1 rank", 1, 4),
        ("zero1, 2 ranks", 2, 8),
    ]
    assert all(r["tokens_per_s"] > 0 and r["step_s"] > 0 for r in rows)
    assert f"zero1: 2 ranks run at {rows[1]['scaling']:.3f}x the tokens/s of 1" in proc.stdout


def test_bench_gives_a_failing_or_timed_out_variant_a_row(tmp_path, env):
    """A variant that fails (a bad override: exit 2) or runs past --timeout still gets its row, with
    its exit status and the last line of its log; the variants after it run, and the bench ends
    with exit status 1."""
    rows_file = tmp_path / "rows.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "bench.py"),
            "--config",
            "debug",
            "--timeout",
            "2",
            "--json",
            str(rows_file),
            "--variant",
            "bad: train.micro_batch_size=0",
            "--variant",
            "slow: parallel.zero_stage=1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert (proc.returncode, proc.stderr.splitlines()[-1]) == (1, "bench: 2 of 2 rows failed (their rows say why)")
    bad, slow = json.loads(rows_file.read_text())
    assert (
        bad["error"].startswith("exit status 2: error: config error: ")
        and "train.micro_batch_size: must be positive" in bad["error"]
    ), bad
    assert slow["error"].startswith("timed out after 2 s: "), slow
    assert proc.stdout.count("| failed: ") == 2


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["data.embedded_vocab_size=2"],
            "error: config error: command line: data.embedded_vocab_size: must be at least 512",
        ),
        (
            [],
            "error: bench --baseline: plain PyTorch's row is measured on a CUDA GPU, and this machine has none; "
            "drop --baseline",
        ),
    ],
)
def test_bench_baseline_refuses_bad_input_in_one_line(env, args, message):
    """--baseline trains the variants' shared config in the bench's own process: a bad one, or a
    machine without a GPU, is one line and exit status 2 before any row, not a traceback."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench.py"), "--config", "debug", "--baseline", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert (proc.returncode, proc.stderr.strip(), proc.stdout) == (2, message, "")
