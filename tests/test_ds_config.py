"""Batch arithmetic and the DeepSpeed config built from ours."""

from __future__ import annotations

import dataclasses

import pytest

from dist_lm.config.batch import batch_sizes
from dist_lm.config.io import load_config
from dist_lm.config.schema import ConfigError, OptimConfig, ParallelConfig, TrainConfig
from dist_lm.model.counts import count_parameters
from dist_lm.runtime.ds_config import deepspeed_config


def test_global_batch_splits_into_micro_accum_ranks():
    plan = batch_sizes(TrainConfig(micro_batch_size=4, global_batch_size=64), dp_size=4)
    assert (plan.micro_batch_size, plan.grad_accum_steps, plan.dp_size) == (4, 4, 4)
    assert plan.global_batch_size == 64 and plan.per_rank_batch_size == 16
    assert batch_sizes(TrainConfig(micro_batch_size=4), dp_size=3).global_batch_size == 12


def test_indivisible_global_batch_names_key_and_fix():
    with pytest.raises(
        ConfigError, match=r"train.global_batch_size: 10 is not a multiple of .* = 4 x 2 = 8; use 8 or 16"
    ):
        batch_sizes(TrainConfig(micro_batch_size=4, global_batch_size=10), dp_size=2)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "bf16-autocast"])
def test_deepspeed_config_keys(stage, precision):
    if precision == "bf16-autocast" and stage:
        with pytest.raises(ConfigError, match="precision: bf16-autocast .* set parallel.zero_stage=0"):
            ParallelConfig(zero_stage=stage, precision=precision)
        return
    plan = batch_sizes(TrainConfig(micro_batch_size=2, global_batch_size=16), dp_size=2)
    ds = deepspeed_config(ParallelConfig(zero_stage=stage), OptimConfig(grad_clip=0.5), plan, precision)
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 4
    # With fp32 weights at ZeRO-0 the trainer clips (dist_lm.runtime.engine.step), DeepSpeed not
    fp32_weights_at_zero0 = stage == 0 and precision in ("fp32", "bf16-autocast")
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_clipping"] == (
        0 if fp32_weights_at_zero0 else 0.5
    )
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"]["enabled"] == (precision == "bf16") and ds["fp16"]["enabled"] == (precision == "fp16")
    assert ds.get("torch_autocast") == (
        {"enabled": True, "dtype": "bfloat16"} if precision == "bf16-autocast" else None
    )
    assert "optimizer" not in ds  # a torch AdamW is passed in
    # bf16 gradients accumulate in fp32 wherever DeepSpeed can (ZeRO 1-3)
    fp32_accum = ds.get("data_types", {}).get("grad_accum_dtype") == "fp32"
    assert fp32_accum == (precision == "bf16" and stage >= 1)


def test_deepcompile_is_deepspeeds_compile_section():
    plan = batch_sizes(TrainConfig(micro_batch_size=1), dp_size=1)
    on = ParallelConfig(zero_stage=3, compile=True, deepcompile=True)
    assert deepspeed_config(on, OptimConfig(), plan, "bf16")["compile"] == {"deepcompile": True}
    assert "compile" not in deepspeed_config(ParallelConfig(zero_stage=3, compile=True), OptimConfig(), plan, "bf16")


def test_deepcompile_from_a_preset_gives_way_to_a_lower_stage_or_no_compile():
    """h100-multinode turns DeepCompile on; lowering its ZeRO stage or turning compile off is a
    plain run, not a config error."""
    plan = batch_sizes(TrainConfig(micro_batch_size=1), dp_size=1)
    assert load_config("h100-multinode").parallel.uses_deepcompile
    for overrides in (["parallel.zero_stage=2"], ["parallel.compile=false"]):
        parallel = load_config("h100-multinode", overrides).parallel
        assert parallel.deepcompile and not parallel.uses_deepcompile
        assert "compile" not in deepspeed_config(parallel, OptimConfig(), plan, "bf16")


def test_compile_mode_is_what_the_engine_runs_and_the_log_says():
    import torch

    from dist_lm.runtime.engine import REGIONAL, compile_mode

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    multinode = load_config("h100-multinode").parallel
    assert compile_mode(multinode, gpu) == "DeepCompile"
    assert compile_mode(load_config("h100-multinode", ["parallel.deepcompile=false"]).parallel, gpu) == "torch.compile"
    assert compile_mode(load_config("h100-multinode", ["parallel.zero_stage=2"]).parallel, gpu) == "torch.compile"
    regions = ["parallel.compile_regions=true"]
    assert compile_mode(load_config("h100-multinode", ["parallel.zero_stage=2", *regions]).parallel, gpu) == REGIONAL
    assert (
        compile_mode(load_config("h100-multinode", ["parallel.deepcompile=false", *regions]).parallel, gpu)
        == "torch.compile"
    )  # not at ZeRO-3
    assert compile_mode(load_config("h100-multinode", ["parallel.compile=false"]).parallel, gpu) == ""
    assert compile_mode(multinode, cpu) == ""


def test_deepcompile_schedule_is_deepspeeds_counted_from_the_start_step():
    from dist_lm.runtime.engine import deepcompile_schedule, deepcompile_warmup

    assert deepcompile_warmup() == 5  # DeepSpeed 0.19.8's; the GPU test's step numbers assume it
    assert deepcompile_schedule(4) == [(4, ["zero3_compile"]), (9, ["zero3_compile", "prefetch", "selective_gather"])]


def test_a_compiled_run_says_why_its_first_step_is_slow():
    import torch

    from dist_lm.runtime.engine import compile_wait

    gpu = torch.device("cuda", 0)
    resumed = compile_wait(load_config("h100-multinode").parallel, gpu, start_step=4)
    assert "DeepCompile" in resumed and "step 10 again" in resumed  # the schedule's second set, 1-based
    assert "torch.compile" in compile_wait(load_config("h100-80gb").parallel, gpu, 0)
    assert compile_wait(load_config("h100-80gb").parallel, torch.device("cpu"), 0) == ""


def test_offload_uses_deepspeed_cpu_adam():
    plan = batch_sizes(TrainConfig(micro_batch_size=1), dp_size=1)
    ds = deepspeed_config(
        ParallelConfig(zero_stage=3, offload_optimizer=True, offload_params=True),
        OptimConfig(lr=1e-3, weight_decay=0.05),
        plan,
        "bf16",
    )
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["weight_decay"] == 0.05
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_deepspeeds_throughput_timer_is_off():
    """It synchronizes the device twice a step (dist_lm.runtime.ds_config says why that costs);
    read back through DeepSpeed's own parser, so a misspelt key cannot pass."""
    from deepspeed.utils.config import get_timers_config

    ds = deepspeed_config(ParallelConfig(), OptimConfig(), batch_sizes(TrainConfig(micro_batch_size=2), 1), "bf16")
    assert get_timers_config(ds).enabled is False
    assert get_timers_config({}).enabled and get_timers_config({}).synchronized  # DeepSpeed's default


def test_zero_plus_plus_keys_and_where_they_are_refused():
    """ZeRO++ is config alone: hpZ's group size and the quantized collectives become DeepSpeed's
    keys at ZeRO-3; below it, on a CPU, or with an hpZ group that does not divide the ranks, one
    line names the key."""
    from dist_lm.config.layout import parallel_layout
    from dist_lm.plan import memory
    from dist_lm.runtime.ds_config import check_device_options

    plus = ParallelConfig(
        zero_stage=3, zero_hpz_partition_size=8, zero_quantized_weights=True, zero_quantized_gradients=True
    )
    zero = deepspeed_config(plus, OptimConfig(), batch_sizes(TrainConfig(), 16), "bf16")["zero_optimization"]
    assert (zero["zero_hpz_partition_size"], zero["zero_quantized_weights"], zero["zero_quantized_gradients"]) == (
        8,
        True,
        True,
    )
    plain = deepspeed_config(ParallelConfig(zero_stage=3), OptimConfig(), batch_sizes(TrainConfig(), 16), "bf16")
    assert not {k for k in plain["zero_optimization"] if k.startswith("zero_")}
    for key in ("zero_quantized_weights", "zero_quantized_gradients"):
        with pytest.raises(ConfigError, match=f"{key}: is ZeRO\\+\\+, .* needs parallel.zero_stage=3"):
            ParallelConfig(zero_stage=2, **{key: True})
        with pytest.raises(ConfigError, match=f"parallel.{key}: .* GPU runs only, and this run is on the CPU"):
            check_device_options(ParallelConfig(zero_stage=3, **{key: True}), "cpu")
    check_device_options(plus, "cuda")
    model = dataclasses.replace(load_config("debug").model, vocab_size=512)
    with pytest.raises(ConfigError, match="parallel.zero_hpz_partition_size: 8 does not divide the 12 ranks"):
        parallel_layout(plus, model, 12)
    # hpZ's secondary partition: each rank holds 1/8 of the bf16 weights more
    hpz, base = (memory.estimate(model, p, "bf16", 1, 16) for p in (plus, ParallelConfig(zero_stage=3)))
    assert hpz.weights - base.weights == pytest.approx(2 * count_parameters(model)["total"] / 8)
