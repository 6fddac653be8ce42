"""Our config -> DeepSpeed's config dict. A pure function.

This is the only module that writes DeepSpeed's keys. The batch sizes it writes come from
:class:`dist_lm.config.batch.BatchSizes`, the only place that multiplies micro-batch, gradient
accumulation and data-parallel size.
"""

from __future__ import annotations

from dist_lm.config.batch import BatchSizes
from dist_lm.config.schema import ConfigError, OptimConfig, ParallelConfig
from dist_lm.runtime.precision import Precision


def deepspeed_config(
    parallel: ParallelConfig,
    optim: OptimConfig,
    batch: BatchSizes,
    precision: Precision | str,
    load_universal: bool = False,
) -> dict:
    """DeepSpeed's JSON config for a resolved precision (a Precision, or its name).
    ``load_universal``: the checkpoint to resume is in DeepSpeed's universal format."""
    precision = Precision(precision)
    zero: dict = {"stage": parallel.zero_stage}
    if parallel.zero_stage > 0:
        zero.update(
            overlap_comm=parallel.overlap_comm,
            contiguous_gradients=True,
            reduce_bucket_size=parallel.reduce_bucket_size,
        )
    if parallel.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = parallel.allgather_bucket_size
    if parallel.zero_hpz_partition_size > 1:
        zero["zero_hpz_partition_size"] = parallel.zero_hpz_partition_size
    if parallel.zero_quantized_weights:
        zero["zero_quantized_weights"] = True
    if parallel.zero_quantized_gradients:
        zero["zero_quantized_gradients"] = True
    if parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if parallel.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}

    config = {
        "train_batch_size": batch.global_batch_size,
        "train_micro_batch_size_per_gpu": batch.micro_batch_size,
        "gradient_accumulation_steps": batch.grad_accum_steps,
        # At ZeRO-0 with fp32 weights the trainer clips (dist_lm.runtime.engine.step): DeepSpeed
        # would take the norm again, one kernel per tensor.
        "gradient_clipping": 0.0 if clips_itself(parallel, precision) else optim.grad_clip,
        "zero_optimization": zero,
        # check_grad_overflow: at ZeRO 1-2 DeepSpeed skips an update whose gradient norm is NaN or
        # inf under bf16 too, as it does for fp16 and fp32 (the trainer counts the skips).
        # immediate_grad_update: at ZeRO-1 (DeepSpeed's BF16_Optimizer) each bf16 gradient is added
        # to the fp32 accumulation buffer as soon as backward produces it and then freed, instead
        # of all being kept to the end of backward and zeroed after: 2 bytes per parameter less
        # memory, and no slower (docs/benchmarks.md, "Speed against plain PyTorch"). Other stages ignore it.
        "bf16": {
            "enabled": precision.deepspeed_section == "bf16",
            "check_grad_overflow": True,
            "immediate_grad_update": True,
        },
        "fp16": {
            "enabled": precision.deepspeed_section == "fp16",
            "loss_scale": 0,  # 0 = dynamic loss scaling
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        # We log ourselves (dist_lm.observe.metrics); DeepSpeed's own step prints would interleave.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronizes the device when each forward starts and each
        # step ends (its default), which keeps the host from queueing the next step's kernels
        # while the GPU works: at small models, where launching takes as long as computing, that
        # idles the GPU. Our own tokens/s (dist_lm.observe.metrics) needs no per-step sync.
        "timers": {"throughput": {"enabled": False}},
        # Our torch.optim.AdamW is a client optimizer DeepSpeed has not "tested" with ZeRO; it is
        # a standard torch optimizer and ZeRO handles it like its own.
        "zero_allow_untested_optimizer": True,
    }
    if precision.autocast:
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    if parallel.tensor_parallel_size > 1:
        config["tensor_parallel"] = {
            "autotp_size": parallel.tensor_parallel_size,
            "partition_config": {"use_default_specs": False, "layer_specs": TENSOR_PARALLEL_LAYERS},
        }
    if parallel.uses_deepcompile:  # takes effect in engine.compile(), which runs on GPUs only
        config["compile"] = {"deepcompile": True}
    if precision.accumulates_in_fp32 and parallel.zero_stage >= 1:
        # (At stage 0 DeepSpeed only supports accumulating in the model's dtype.)
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if optim.name == "muon":
        # DeepSpeed's Muon: matrices of the blocks (it tags parameters by shape, and by name
        # leaves "embed" and "lm_head" to AdamW), AdamW for the rest, each half with its settings.
        config["optimizer"] = {
            "type": "Muon",
            "params": {
                "lr": optim.lr,
                "muon_lr": optim.muon_lr,
                "adam_lr": optim.lr,
                "momentum": optim.muon_momentum,
                "betas": [optim.beta1, optim.beta2],
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
            },
        }
    elif parallel.offload_optimizer:
        # With the optimizer on the CPU DeepSpeed builds its own CPU Adam (AVX, multithreaded);
        # a torch optimizer there would be several times slower.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": [optim.beta1, optim.beta2],
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
            },
        }
    return config


# Our model's linear layers (dist_lm.model.layers), named for DeepSpeed's AutoTP: the projections
# into the heads and into the MLP's width split by their outputs (column), the projections back
# by their inputs (row, all-reduced after). The embeddings, the output head and the norms stay
# whole on every rank. AutoTP's built-in presets name Hugging Face's layers, not ours.
TENSOR_PARALLEL_LAYERS = [
    {"patterns": [r".*\.(wq|wk|wv|w_in|w_gate)\.weight$"], "partition_type": "column"},
    {"patterns": [r".*\.(wo|w_out)\.weight$"], "partition_type": "row"},
]


def clips_itself(parallel: ParallelConfig, precision: Precision) -> bool:
    """Whether DeepSpeed steps the torch optimizer as it is, leaving the norm and the clip to us:
    ZeRO-0 with fp32 weights (fp32, bf16-autocast), without tensor parallelism (whose shards'
    norm DeepSpeed sums over the tensor-parallel ranks)."""
    return parallel.zero_stage == 0 and precision.deepspeed_section is None and parallel.tensor_parallel_size == 1


def check_device_options(parallel: ParallelConfig, device_type: str) -> None:
    """Refuse, in one line, what DeepSpeed runs only on GPUs: ZeRO++'s quantized collectives
    (its quantizer is a CUDA kernel, with no CPU build)."""
    if device_type == "cuda":
        return
    for key in ("zero_quantized_weights", "zero_quantized_gradients"):
        if getattr(parallel, key):
            raise ConfigError(
                f"parallel.{key}",
                f"DeepSpeed's quantized collectives are CUDA kernels: GPU runs only, and this run is on the "
                f"{device_type.upper()}; set parallel.{key}=false",
            )
