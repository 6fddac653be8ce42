"""Hardware detection, the memory model and the --config auto plan, on described machines (pure
functions: no GPU needed), plus the plan tool and the pre-flight checks of the launch."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_ok, launch
from dist_lm.config.io import load_config
from dist_lm.config.schema import ModelConfig, ParallelConfig, UserError
from dist_lm.plan.launch import format_plan, launch_commands
from dist_lm.plan.memory import GB, estimate
from dist_lm.plan.planner import make_plan, settings_to_keep
from dist_lm.plan.sizing import largest_fitting, usable_gb
from dist_lm.runtime.hardware import Machine, detect_machine, peak_flops_for
from dist_lm.runtime.launch import check_master_reachable, detect
from dist_lm.runtime.precision import Precision

RTX_3060 = Machine(1, "NVIDIA GeForce RTX 3060", 12.0, (8, 6), 1, 12, 32)
RTX_4090 = Machine(1, "NVIDIA GeForce RTX 4090", 24.0, (8, 9), 1, 16, 64)
H100 = Machine(1, "NVIDIA H100 80GB HBM3", 80.0, (9, 0), 1, 16, 128)
H100_CLUSTER = Machine(8, "NVIDIA H100 80GB HBM3", 80.0, (9, 0), 4, 128, 1000)
CPU_ONLY = Machine(0, cpu_cores=2, ram_gb=8)


def option(plan, key):
    return getattr(getattr(plan.config, key.split(".")[0]), key.split(".")[1])


def fits(plan) -> bool:
    return plan.memory.total <= usable_gb(plan.machine) * GB


# ------------------------------------------------------------------------------------- machines
def test_peak_table_matches_specific_names_first():
    assert peak_flops_for("NVIDIA GeForce RTX 3060 Ti") == 32e12
    assert peak_flops_for("NVIDIA GeForce RTX 3060") == 25e12
    assert peak_flops_for("NVIDIA H100 PCIe") == 756e12 and peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for("NVIDIA GeForce RTX 5090") == 209e12
    assert peak_flops_for("Some Future Accelerator") is None  # unknown: no guess


def test_bf16_from_compute_capability():
    assert RTX_3060.bf16 and H100.bf16
    assert not Machine(1, "Tesla V100-SXM2-32GB", 32, (7, 0)).bf16
    assert not Machine(1, "Tesla T4", 16).bf16  # no capability given: known pre-Ampere name


def test_this_machine_is_detected():
    m = detect_machine(nodes=1)
    assert m.cpu_cores >= 1 and m.ram_gb > 0
    import torch

    assert m.has_gpu == torch.cuda.is_available() and m.world_size >= 1


# --------------------------------------------------------------------------------- memory model
def _model(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=32000, seq_len=2048, d_model=2048, n_layers=24, n_heads=16, **kw)


def test_zero_stages_shard_what_they_promise():
    model = _model()
    e = {s: estimate(model, ParallelConfig(zero_stage=s), "bf16", 1, 8) for s in (0, 1, 2, 3)}
    assert e[1].optimizer == pytest.approx(e[0].optimizer / 8)
    assert e[2].grads < e[1].grads and e[2].weights == e[1].weights
    assert e[3].weights == pytest.approx(e[2].weights / 8)
    assert estimate(model, ParallelConfig(zero_stage=2, offload_optimizer=True), "bf16", 1, 8).optimizer == 0


def test_activation_checkpointing_and_micro_batch():
    model = _model()
    plain = estimate(model, ParallelConfig(), "bf16", 4, 1)
    ckpt = estimate(model, ParallelConfig(activation_checkpointing=True), "bf16", 4, 1)
    assert ckpt.activations < plain.activations / 5
    assert estimate(model, ParallelConfig(), "bf16", 8, 1).activations == pytest.approx(2 * plain.activations)


# docs/benchmarks.md, one H100, ZeRO-1, bf16, embedded corpus, with immediate_grad_update (fourth
# session). The eager count is a model of autograd's saved tensors; the compiled one was counted.
@pytest.mark.parametrize(
    "preset, overrides, micro, measured_gb, tolerance",
    [
        ("h100-80gb", ["parallel.compile=false"], 8, 58.16, 0.15),  # 1.13B, seq 2048, eager
        ("h100-80gb", [], 8, 46.6, 0.05),  # the preset: compiled
        ("rtx-12gb", ["model.vocab_size=32000", "parallel.activation_checkpointing=false"], 64, 25.7, 0.05),  # ~125M
    ],
)
def test_estimate_near_the_h100_measurements(preset, overrides, micro, measured_gb, tolerance):
    cfg = load_config(preset, ["model.vocab_size=4096", *overrides])
    predicted = estimate(cfg.model, cfg.parallel, "bf16", micro, 1).total / GB
    assert abs(predicted / measured_gb - 1) < tolerance


# docs/benchmarks.md, 2026-12-03, one H200, bf16-autocast at ZeRO-0, compiled, embedded corpus: the
# 1.1B auto plan and the 24 GB plan. Before the fp32 residual stream was counted, the first
# predicted 125.1 GB at micro-batch 32 and peaked at 138.15 GB.
@pytest.mark.parametrize("preset, micro, measured_gb", [("h100-80gb", 16, 79.35), ("rtx-24gb", 8, 19.42)])
def test_bf16_autocast_estimate_near_the_h200_measurements(preset, micro, measured_gb):
    cfg = load_config(
        preset,
        [
            "parallel.precision=bf16-autocast",
            "parallel.zero_stage=0",
            "parallel.activation_checkpointing=false",
            "model.vocab_size=4096",
        ],
    )
    predicted = estimate(cfg.model, cfg.parallel, "bf16-autocast", micro, 1)
    assert abs(predicted.total / GB / measured_gb - 1) < 0.05
    bf16 = estimate(cfg.model, dataclasses.replace(cfg.parallel, zero_stage=1, precision="bf16"), "bf16", micro, 1)
    assert predicted.activations > bf16.activations  # the fp32 residual stream


# ------------------------------------------------------------------------------------------ plans
def test_rtx_3060_gets_the_small_preset_in_bf16():
    plan = make_plan(RTX_3060)
    assert plan.preset == "rtx-12gb" and option(plan, "parallel.precision") == "bf16" and fits(plan)
    assert plan.config.train.global_batch_size % (plan.config.train.micro_batch_size * 1) == 0


def test_one_gpu_without_accumulation_trains_bf16_autocast_unless_the_precision_or_stage_is_given():
    """One GPU with every micro-batch a step: ZeRO-0 with fp32 weights under autocast (faster
    there than DeepSpeed's bf16 optimizer, docs/benchmarks.md), said in the plan's reasons. At the
    preset's accumulation, given a precision or a stage, or on several GPUs, DeepSpeed's bf16 at ZeRO-1."""
    plan = make_plan(H100, ["train.global_batch_size=8"])
    assert plan.config.train.micro_batch_size == 8
    assert (option(plan, "parallel.precision"), option(plan, "parallel.zero_stage")) == ("bf16-autocast", 0)
    assert any(r.startswith("bf16-autocast at ZeRO stage 0: one GPU shards nothing") for r in plan.reasons)
    assert fits(plan) and "parallel.precision=bf16-autocast" in launch_commands(plan)["python"]
    for given in (
        [],
        ["train.global_batch_size=8", "parallel.precision=bf16"],
        ["train.global_batch_size=8", "parallel.zero_stage=1"],
    ):
        plan = make_plan(H100, given)
        assert (plan.config.parallel.precision, option(plan, "parallel.zero_stage")) == ("bf16", 1), given
    eight = make_plan(dataclasses.replace(H100, gpus_per_node=8), ["train.global_batch_size=64"])
    assert (option(eight, "parallel.precision"), option(eight, "parallel.zero_stage")) == ("bf16", 1)


def test_a_short_run_on_one_gpu_is_compiled_by_regions():
    """Compiling by regions reaches the first step sooner and costs a little on every micro-batch
    (measured on an H200, docs/benchmarks.md): the plan takes it when the whole run then ends
    sooner, and not for a long run, in bf16-autocast or on several GPUs (not measured there), or
    when the user set a compile key."""
    h200 = Machine(1, "NVIDIA H200", 150.11, (9, 0), 1, 16, 135)
    short = make_plan(h200, ["train.max_steps=100"])
    assert (short.config.train.micro_batch_size, short.config.train.global_batch_size) == (32, 512)
    assert short.config.parallel.compile_regions is True
    assert "compiled by regions: the run's 1,600 micro-batches end about 21 s sooner" in format_plan(short)
    assert "parallel.compile_regions=true" in launch_commands(short)["python"]
    by_tokens = make_plan(h200, ["train.max_steps=50000", "train.max_tokens=50000000"])  # 48 steps of 1M tokens
    assert by_tokens.config.parallel.compile_regions is True
    one_micro_batch_a_step = make_plan(
        H100, ["train.max_steps=100", "train.global_batch_size=8", "parallel.zero_stage=1"]
    )
    assert (
        one_micro_batch_a_step.config.parallel.precision,
        one_micro_batch_a_step.config.parallel.compile_regions,
    ) == ("bf16", True)
    for machine, given in (
        (h200, []),
        (h200, ["train.max_steps=300"]),
        (h200, ["train.max_steps=100", "parallel.compile_regions=false"]),
        (h200, ["train.max_steps=100", "parallel.compile=false"]),
        (H100, ["train.max_steps=100", "train.global_batch_size=8"]),  # bf16-autocast
        (dataclasses.replace(h200, gpus_per_node=2), ["train.max_steps=100"]),
    ):
        plan = make_plan(machine, given)
        assert plan.config.parallel.compile_regions is False, given
        assert not any(r.startswith("compiled by regions") for r in plan.reasons), given


def test_a_resumed_run_keeps_what_its_checkpoint_can_load():
    """The plan of a run that resumes keeps the checkpoint's bf16-autocast (fp32 weights and torch
    optimizer state) on any number of GPUs, and its ZeRO-0, which no other stage loads; a
    checkpoint with low-precision weights is not resumed in bf16-autocast; what the user gives wins."""
    two = dataclasses.replace(H100, gpus_per_node=2)
    plan = make_plan(two, ["train.global_batch_size=16"], resumed=(Precision.BF16_AUTOCAST, 0))
    assert (plan.config.parallel.precision, plan.config.parallel.zero_stage) == ("bf16-autocast", 0)
    assert plan.reasons[-1] == (
        "kept from the checkpoint it resumes, whose state loads only so: "
        "parallel.precision=bf16-autocast parallel.zero_stage=0"
    )
    assert "parallel.precision=bf16-autocast parallel.zero_stage=0" in launch_commands(plan)["torchrun"]
    for resumed, expected in (
        ((Precision.BF16, 1), ("bf16", 1)),
        ((Precision.FP8, 1), ("bf16", 1)),
        ((Precision.BF16, 0), ("bf16", 0)),
        ((Precision.FP32, 2), ("bf16", 1)),
    ):
        plan = make_plan(H100, ["train.global_batch_size=8"], resumed=resumed)  # fresh: bf16-autocast
        assert (plan.config.parallel.precision, plan.config.parallel.zero_stage) == expected, resumed
    given = make_plan(H100, ["train.global_batch_size=8", "parallel.zero_stage=1"], resumed=(Precision.BF16, 0))
    assert given.config.parallel.zero_stage == 1 and not any(r.startswith("kept from") for r in given.reasons)
    assert settings_to_keep(None, set()) == [] and settings_to_keep((Precision.FP16, 3), set()) == []


def test_rtx_4090_gets_the_24gb_preset():
    plan = make_plan(RTX_4090)
    assert plan.preset == "rtx-24gb" and fits(plan)
    assert not option(plan, "parallel.offload_optimizer")


def test_one_h100_gets_the_1b_preset_without_recomputation():
    plan = make_plan(H100)
    assert plan.preset == "h100-80gb" and fits(plan)
    assert option(plan, "parallel.activation_checkpointing") is False and plan.config.train.micro_batch_size >= 4


def test_four_nodes_of_eight_h100_get_the_multinode_preset():
    plan = make_plan(H100_CLUSTER)
    assert plan.preset == "h100-multinode" and plan.world_size == 32 and fits(plan)
    train = plan.config.train
    assert train.global_batch_size % (train.micro_batch_size * 32) == 0
    cmds = launch_commands(plan)
    assert "NNODES=4" in cmds["torchrun"] and 'HOSTS="node0 node1 node2 node3"' in cmds["deepspeed"]
    assert "NP=32" in cmds["mpirun"] and cmds["sbatch"].startswith("sbatch --nodes=4 --gpus-per-node=8")


def test_a_zero3_plan_across_nodes_gathers_within_each_node_with_hpz():
    """ZeRO++ hpZ in groups of a node's GPUs for a ZeRO-3 plan on several nodes, counted by the
    memory model; not on one node, and not where the user set the group."""
    plan = make_plan(H100_CLUSTER, ["parallel.zero_stage=3"])
    assert option(plan, "parallel.zero_hpz_partition_size") == 8 and plan.config.parallel.zero_hpz_partition_size == 8
    assert any("ZeRO++ hpZ in groups of 8" in r for r in plan.reasons) and fits(plan)
    assert plan.config.parallel.zero_hpz_partition_size == 8
    assert make_plan(H100, ["parallel.zero_stage=3"]).config.parallel.zero_hpz_partition_size == 1
    given = make_plan(H100_CLUSTER, ["parallel.zero_stage=3", "parallel.zero_hpz_partition_size=4"])
    assert given.config.parallel.zero_hpz_partition_size == 4


def test_an_installed_package_is_told_the_commands_it_has():
    """`dist-lm plan` from `pip install dist-lm` suggested launchers/pretrain.py, which an install
    does not have: it gets the dist-lm command and the launchers' module forms."""
    one, cluster = make_plan(CPU_ONLY), make_plan(H100_CLUSTER)
    assert launch_commands(one, from_checkout=False) == {"dist-lm": f"dist-lm train {' '.join(one.explicit_args())}"}
    cmds = launch_commands(cluster, from_checkout=False)
    assert cmds["torchrun"].startswith("torchrun --nnodes 4 --nproc_per_node 8 --node_rank <0..3>")
    assert " -m dist_lm train " in cmds["torchrun"] and " --module dist_lm train " in cmds["deepspeed"]
    assert not any("launchers/" in c or "slurm/" in c for c in cmds.values())


def test_cpu_plans_the_debug_preset():
    plan = make_plan(CPU_ONLY)
    assert plan.preset == "debug" and plan.memory is None
    assert list(launch_commands(plan)) == ["python"]


def test_fp16_on_a_card_without_bf16():
    plan = make_plan(Machine(1, "Tesla T4", 16.0, (7, 5)))
    assert option(plan, "parallel.precision") == "fp16"


def test_explicit_values_always_win():
    plan = make_plan(H100, ["parallel.zero_stage=3", "train.micro_batch_size=2", "model.n_layers=12"])
    assert option(plan, "parallel.zero_stage") == 3 and plan.config.train.micro_batch_size == 2
    assert plan.config.model.n_layers == 12
    assert not any(c.startswith(("parallel.zero_stage", "train.micro_batch_size")) for c in plan.choices)
    assert "kept as given: model.n_layers, parallel.zero_stage, train.micro_batch_size" in "\n".join(plan.reasons)


def test_plan_reproduces_through_the_explicit_command():
    plan = make_plan(RTX_4090, ["optim.lr=1e-3"])
    args = plan.explicit_args()
    assert args[:2] == ["--config", "rtx-24gb"] and args[-1] == "optim.lr=1e-3"
    again = load_config(args[1], args[2:])
    assert dataclasses.asdict(again) == dataclasses.asdict(plan.config)


def test_a_small_card_falls_back_to_recomputation_then_offload():
    small = make_plan(Machine(1, "NVIDIA GeForce RTX 3050", 6.0, (8, 6)))
    assert small.preset == "rtx-12gb" and fits(small)
    tiny = make_plan(Machine(1, "NVIDIA GeForce RTX 3050", 3.0, (8, 6)))
    assert option(tiny, "parallel.activation_checkpointing") and option(tiny, "parallel.offload_optimizer")
    assert fits(tiny) and tiny.config.parallel.reduce_bucket_size < 500_000_000


def test_nothing_fits_says_what_to_change():
    with pytest.raises(UserError, match=r"nothing fits in 0.3 GB of each 2 GB GPU.*model.d_model"):
        make_plan(Machine(1, "tiny", 2.0, (8, 0)))


def test_plan_tool_describes_a_cluster():
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "plan.py"),
            "--gpus",
            "8",
            "--gpu-mem",
            "80",
            "--nodes",
            "4",
            "--gpu-name",
            "H100",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "plan: preset h100-multinode, 32 rank(s)" in proc.stdout
    assert "sbatch --nodes=4" in proc.stdout and "launchers/mpirun.sh" in proc.stdout
    described = Machine(8, "H100", 80.0, None, 4, 32, 256.0)  # the tool's defaults for cores and RAM
    assert proc.stdout.strip() == format_plan(make_plan(described))


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="checks the message on a machine without a GPU (tests/test_gpu.py probes a real one)",
)
def test_find_batch_needs_a_gpu_and_a_good_config(env):
    def find_batch(*args):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "find_batch.py"), *args],
            env=env,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        return proc.stderr

    assert "this machine has none; dist-lm plan predicts" in find_batch("--config", "debug")
    assert "train.micro_batch_size: expected int" in find_batch("--config", "debug", "train.micro_batch_size=big")


def test_pretrain_plan_on_this_machine(env):
    proc = launch("python", ["--plan"], env)
    assert_ok(proc)
    assert "plan: preset debug" in proc.stdout and "python launchers/pretrain.py --config debug" in proc.stdout


def test_no_config_trains_the_auto_plan(env, tmp_path):
    proc = launch("python", ["train.max_steps=2", "train.eval_interval=0", f"run.dir={tmp_path}"], env)
    assert_ok(proc)
    assert "plan: preset debug, 1 rank(s)" in proc.stdout and (tmp_path / "metrics.jsonl").is_file()


# ---------------------------------------------------------------------------------- pre-flight
def test_multinode_master_address_must_be_routable():
    env = {"RANK": "0", "WORLD_SIZE": "16", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "8", "MASTER_PORT": "29500"}
    with pytest.raises(UserError, match="MASTER_ADDR=127.0.0.1 is this machine's loopback address"):
        check_master_reachable(detect({**env, "MASTER_ADDR": "127.0.0.1"}))
    with pytest.raises(UserError, match="MASTER_ADDR=localhost is this machine's loopback"):
        check_master_reachable(detect({**env, "MASTER_ADDR": "localhost"}))
    with pytest.raises(UserError, match="does not resolve"):
        check_master_reachable(detect({**env, "MASTER_ADDR": "no-such-host.invalid"}))
    check_master_reachable(detect({**env, "MASTER_ADDR": "10.1.2.3"}))
    check_master_reachable(detect({**env, "LOCAL_WORLD_SIZE": "16", "MASTER_ADDR": "127.0.0.1"}))  # one node


def test_multinode_loopback_master_fails_before_the_process_group(env):
    env = {
        **env,
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }
    proc = launch("python", ["--config", "debug"], env, timeout=60)
    assert proc.returncode == 2 and "loopback address" in proc.stderr and "dist-lm:" not in proc.stdout


def test_cpu_adam_needs_a_compiler(monkeypatch):
    from dist_lm.runtime import op_builds

    op_builds.check_cpu_adam()  # this machine can build it (test_engine_launchers runs the offload engine)
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(UserError, match=r"offload_optimizer=true needs DeepSpeed's CPU Adam.*no-such-compiler"):
        op_builds.check_cpu_adam()


def test_offload_binds_each_rank_to_its_own_cores():
    code = (
        "import os; from dist_lm.runtime.hardware import bind_cores; n = len(os.sched_getaffinity(0)); "
        "print(n, bind_cores(1, 2), sorted(os.sched_getaffinity(0)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout.split(maxsplit=1)
    n = int(out[0])
    if n < 2:
        pytest.fail("this test needs at least 2 cores (CI has 2)")
    per = n // 2
    expected = list(range(n))[per : 2 * per]
    assert out[1].strip() == f"{expected} {expected}".replace("'", "")


# ---------------------------------------------------------------- the micro-batch probe's search
@pytest.mark.parametrize("start", [1, 3, 8, 64, 500])
@pytest.mark.parametrize("largest", [0, 1, 5, 8, 37, 64, 100])
def test_largest_fitting_finds_the_edge_trying_each_size_once(start, largest):
    tried = []

    def fits(n):
        tried.append(n)
        return n <= largest

    assert largest_fitting(fits, start, limit=100) == largest
    assert len(tried) == len(set(tried)) and all(1 <= n <= 100 for n in tried)
    assert len(tried) <= 16  # doubling or halving, then bisection: logarithmic


def test_fp8_is_planned_as_bf16_on_gpus_with_float8_and_refused_on_others():
    fp8 = ["parallel.precision=fp8", "parallel.compile=true"]
    plan = make_plan(RTX_4090, fp8)
    assert plan.config.parallel.precision == "fp8" and fits(plan)
    assert any("precision fp8 (as given): memory counted as bf16" in r for r in plan.reasons)
    with pytest.raises(UserError, match="needs GPUs with float8 tensor cores .* which NVIDIA GeForce RTX 3060 lack"):
        make_plan(RTX_3060, fp8)
    by_name = [Machine(1, name, 80.0).fp8 for name in ("NVIDIA A100-SXM4-80GB", "NVIDIA H200", "Some GPU")]
    assert by_name == [False, True, None]  # described without a compute capability (dist-lm plan --gpu-name)


LLAMA_8B = [
    "model.d_model=4096",
    "model.n_layers=32",
    "model.n_heads=32",
    "model.n_kv_heads=8",
    "model.ffn_hidden=14336",
    "model.vocab_size=128256",
    "train.global_batch_size=64",
]


def test_the_plan_splits_a_window_only_when_it_does_not_fit_whole():
    """docs/parallelism.md's example: an 8B model on 2 nodes of 8 H100. At 32k tokens all 16
    ranks stay data-parallel (ZeRO-3 fits); at 128k no setting fits a whole window, and the
    plan splits each over the fewest ranks that fit it, saying why. A size the user gives is kept."""
    machine = Machine(8, "NVIDIA H100 80GB HBM3", 80.0, (9, 0), 2, 32, 256)
    whole = make_plan(machine, [*LLAMA_8B, "model.seq_len=32768"])
    assert whole.config.parallel.sequence_parallel_size == 1
    assert "global batch 64 = micro 1 x accumulation 4 x data-parallel ranks 16" in whole.reasons
    split = make_plan(machine, [*LLAMA_8B, "model.seq_len=131072"])
    sp = split.config.parallel.sequence_parallel_size
    assert sp == 8 and f"parallel.sequence_parallel_size={sp}" in split.choices
    assert any(r.startswith("sequence parallel size 8: a window of 131,072 tokens does not fit") for r in split.reasons)
    assert split.memory.total <= split.budget_gb * GB
    kept = make_plan(machine, [*LLAMA_8B, "model.seq_len=32768", "parallel.sequence_parallel_size=8"])
    assert kept.config.parallel.sequence_parallel_size == 8
    assert not any("sequence parallel size" in r for r in kept.reasons)


def test_a_tensor_parallel_size_given_to_the_plan_is_counted_and_kept():
    """The plan does not choose tensor parallelism, but a size the user gives it is the layout it
    plans: a quarter of the ranks' data-parallel, each holding an eighth of the blocks' layers."""
    machine = Machine(8, "NVIDIA H100 80GB HBM3", 80.0, (9, 0), 2, 32, 256)
    given = [*LLAMA_8B, "model.seq_len=8192", "parallel.zero_stage=1"]
    whole = make_plan(machine, given)
    split = make_plan(machine, [*given, "parallel.tensor_parallel_size=8"])
    assert split.config.parallel.tensor_parallel_size == 8 and split.config.parallel.sequence_parallel_size == 1
    assert any(r.endswith("x data-parallel ranks 2") for r in split.reasons)
    assert split.memory.weights < whole.memory.weights / 4
