"""The one call to deepspeed.initialize, and the few engine operations the trainer needs.

Only this module, :mod:`dist_lm.runtime.parallel` (the layouts past data parallelism),
:mod:`dist_lm.train.restore` (with :mod:`dist_lm.train.to_universal`, its converter's process)
and :mod:`dist_lm.model.moe` import deepspeed (tests/test_architecture.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree  # torch's own walk over nested containers

if not torch.cuda.is_available():
    # Tell DeepSpeed up front instead of letting it guess and warn about it.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402
from deepspeed.checkpoint.constants import (  # noqa: E402
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)
from deepspeed.module_inject.layers import DS_TENSOR_MODEL_PARALLEL, LinearAllreduce  # noqa: E402  (AutoTP)
from deepspeed.moe.layer import MoE  # noqa: E402  (what dist_lm.model.moe wraps)
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer  # noqa: E402
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer  # noqa: E402
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import (  # noqa: E402
    CheckpointCommitInfo,
    CheckpointEngine,
)
from deepspeed.runtime.chunked_cross_entropy import chunked_cross_entropy  # noqa: E402
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer  # noqa: E402
from deepspeed.utils import groups, safe_get_full_fp32_param, safe_get_full_grad  # noqa: E402

from dist_lm.config.batch import BatchSizes  # noqa: E402
from dist_lm.config.layout import ParallelLayout  # noqa: E402
from dist_lm.config.schema import OptimConfig, ParallelConfig  # noqa: E402
from dist_lm.model.loss import TrainingOptions, uses_chunked  # noqa: E402
from dist_lm.model.transformer import Transformer  # noqa: E402
from dist_lm.runtime import fp8, op_builds  # noqa: E402
from dist_lm.runtime import parallel as runtime_parallel  # noqa: E402
from dist_lm.runtime.ds_config import deepspeed_config  # noqa: E402
from dist_lm.runtime.hardware import host_memory_for  # noqa: E402
from dist_lm.runtime.host_buffers import HostBuffers  # noqa: E402
from dist_lm.runtime.optim import client_optimizer, param_groups  # noqa: E402
from dist_lm.runtime.precision import Precision  # noqa: E402


def quiet(verbose: bool) -> None:
    """DeepSpeed logs its whole config at start-up; keep warnings, drop the chatter unless asked."""
    deepspeed.utils.logger.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        # DeepSpeed's ZeRO calls a torch collective that torch has renamed; nothing for us to act on.
        for renamed in ("all_gather_into_tensor", "reduce_scatter_tensor"):
            warnings.filterwarnings("ignore", message=rf".*{renamed}.* is deprecated", category=FutureWarning)


def initialize(
    model: Transformer,
    parallel: ParallelConfig,
    optim: OptimConfig,
    batch: BatchSizes,
    precision: Precision,
    device: torch.device,
    layout: ParallelLayout,
    load_universal: bool = False,
    start_step: int = 0,
    verbose: bool = False,
) -> "deepspeed.DeepSpeedEngine":
    """The DeepSpeed engine around ``model``, parallel as ``layout`` says (a collective).
    ``start_step``: the step of the checkpoint the run will load (0 for a fresh run), which
    DeepCompile's pass schedule counts from. ``verbose``: let DeepSpeed print what it prints
    bare at start-up."""
    mode = compile_mode(parallel, device)
    chunked = uses_chunked(model.cfg, device.type == "cuda", compiled=bool(mode))
    model.use(
        TrainingOptions(
            activation_checkpointing=parallel.activation_checkpointing,
            z_loss_coef=optim.z_loss,
            row_losses=token_cross_entropy if chunked else None,
            sequence_shard=runtime_parallel.sequence_shard(layout),
            mlp_runner=runtime_parallel.tiled_mlp if parallel.tiled_mlp else None,
        )
    )
    groups_for_deepspeed = runtime_parallel.groups_for(model, layout)
    if precision is Precision.FP8:  # before the optimizer's groups: the same parameters, new modules
        fp8.convert(model, parallel.fp8_recipe)
    # Marks the checkpoints DeepSpeed writes as convertible to its universal format (for resuming
    # on another world size or ZeRO stage; see dist_lm.train.checkpoint).
    setattr(model, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})
    param_sets = param_groups(model, optim.weight_decay)
    if any(getattr(p, "allreduce", True) is False for p in model.parameters()):
        # Expert parameters are reduced over their own data-parallel group: ZeRO needs them in
        # groups of their own.
        param_sets = split_params_into_different_moe_groups_for_optimizer(param_sets)
    if device.type == "cpu":
        # No torch.compile on CPU, ours (parallel.compile) or DeepSpeed's own (its Muon compiles
        # its Newton-Schulz step): Inductor's C++ build costs more than it saves on a CPU run,
        # a minute and a half before the first Muon step on two cores.
        torch._dynamo.config.disable = True
    optimizer = client_optimizer(param_sets, optim, parallel)
    # DeepSpeed prints some of its start-up output bare, past its logger: at bf16 ZeRO-1 its
    # BF16_Optimizer prints memory lines ("begin bf16_optimizer", "MA 0.38 GB ...") on every start.
    # Its logger keeps its own handle on stdout, so its warnings still show.
    with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=param_sets if optimizer is None else None,
            config=deepspeed_config(parallel, optim, batch, precision, load_universal),
            mpu=groups_for_deepspeed,
        )
    if device.type == "cpu":
        dist.barrier()  # every rank past init_distributed, which mapped every rank's segment
        unlink_shared_memory_segment(dist.get_rank())
    if reduces_for_nothing(engine):
        engine.enable_backward_allreduce = False
    if mode == REGIONAL:
        model.compile_regions()
    elif mode:
        engine.compile(schedule=deepcompile_schedule(start_step) if mode == "DeepCompile" else None)
    return engine


@torch.compiler.disable  # DeepSpeed's Triton kernels run as they are, outside a compiled region
def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """model.cross_entropy=chunked: DeepSpeed's chunked cross-entropy, per token (dist_lm.model.loss)."""
    return chunked_cross_entropy(logits, targets, reduction="none")


REGIONAL = "regional torch.compile"


def compile_mode(parallel: ParallelConfig, device: torch.device) -> str:
    """How the engine compiles the model: "torch.compile" (the whole model), REGIONAL (each block
    and the output, parallel.compile_regions, at ZeRO 0-2: at ZeRO-3 DeepSpeed's parameter hooks
    sit inside every block), "DeepCompile", or "" (eager: compile off, or a CPU run, where
    compiling costs more than it saves)."""
    if not parallel.compile or device.type != "cuda":
        return ""
    if parallel.uses_deepcompile:
        return "DeepCompile"
    return REGIONAL if parallel.compile_regions and parallel.zero_stage < 3 else "torch.compile"


def compile_wait(parallel: ParallelConfig, device: torch.device, start_step: int) -> str:
    """What the silence before the first step is, for a compiled run (minutes of it)."""
    mode = compile_mode(parallel, device)
    if mode == "DeepCompile":
        return (
            f"; the first step waits for DeepCompile to compile and profile (minutes at 1B parameters), "
            f"step {start_step + deepcompile_warmup() + 1} again for its prefetching"
        )
    if mode == REGIONAL:
        return "; the first step waits for torch.compile of one block and the output (cached for restarts)"
    return "; the first step waits for torch.compile (minutes at 1B parameters)" if mode else ""


def deepcompile_warmup() -> int:
    """Steps DeepCompile profiles before it adds prefetching and selective unsharding."""
    from deepspeed.compile.init_z3 import WARMUP

    return WARMUP


def deepcompile_schedule(start_step: int) -> list[tuple[int, list[str]]]:
    """DeepCompile's default ZeRO-3 pass schedule, counted from ``start_step``: the gathers and
    releases in the graph first, then after its warm-up steps of profiling also prefetching and
    selective unsharding. DeepSpeed 0.19.8 launches a scheduled pass set only when the engine's
    step count equals its step exactly, and its own schedule starts at 0: a run resumed at step 4
    ran with no passes at all and failed in its first forward (TypeError: 'NoneType' object is not
    iterable). The passes and the warm-up are DeepSpeed's own names and constant."""
    from deepspeed.compile.passes import prefetch, selective_gather, zero3_compile

    return [
        (start_step, [zero3_compile.NAME]),
        (start_step + deepcompile_warmup(), [zero3_compile.NAME, prefetch.NAME, selective_gather.NAME]),
    ]


def zero_plus_plus(engine: "deepspeed.DeepSpeedEngine") -> str:
    """What of ZeRO++ the engine runs, as DeepSpeed itself reports it ("" when none)."""
    parts = []
    if engine.zero_hpz_partition_size() > 1:
        parts.append(f"hpZ, a secondary weight partition within groups of {engine.zero_hpz_partition_size()} ranks")
    if engine.zero_quantized_weights():
        parts.append("qwZ, weights gathered in int8")
    if engine.zero_quantized_gradients():
        parts.append("qgZ, gradients reduced in int4")
    return "; ".join(parts)


def reduces_for_nothing(engine: "deepspeed.DeepSpeedEngine") -> bool:
    """Whether DeepSpeed would all-reduce whole gradients over a data-parallel group of one rank.

    At ZeRO-0, and at ZeRO-1 under bf16 with fp32 accumulation (its BF16_Optimizer), DeepSpeed
    reduces gradients by copying them into flat 500M-element buffers, all-reducing those and
    copying them back, whatever the rank count. Alone, that is an identity that moves ~16 bytes
    per parameter every step (milliseconds a step at 1B parameters), and under
    bf16 it also rounds the fp32-accumulated gradients to bf16 on the way. ZeRO-1
    with DeepSpeed's ZeRO optimizer (fp16, bf16 without fp32 accumulation) and ZeRO-2/3 move
    gradients into their partitions on that same path, so they keep it.
    """
    whole_gradients = engine.zero_optimization_stage() == 0 or isinstance(engine.optimizer, BF16_Optimizer)
    return whole_gradients and engine.dp_world_size == 1 and engine.seq_dp_world_size == 1


def unlink_shared_memory_segment(rank: int) -> None:
    """Remove the name of this rank's segment of DeepSpeed's shared-memory all-reduce.

    On the CPU, where every rank is on one machine and LOCAL_SIZE says so (DeepSpeed's launcher
    sets it), its deepspeed_shm_comm op gives each rank a 69 MB segment in /dev/shm, named by
    uid, master address, port and rank, and never unlinks it (shm.cpp has a shared_close that
    nothing calls): every such run left 69 MB a rank in memory until the machine rebooted, 15 GB
    of this project's 23 GB development machine after a day of test runs. Each rank maps every
    rank's segment in init_distributed, so once all have passed a barrier after it the names can
    go: the mappings last while the processes do, however they end."""
    name = "_".join(
        (
            "deepspeed_allreduce_buffer",
            str(os.getuid()),
            os.environ.get("MASTER_ADDR", ""),
            os.environ.get("MASTER_PORT", ""),
            str(rank),
        )
    )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join("/dev/shm", name))


def load_ops(device: torch.device, parallel: ParallelConfig) -> None:
    """Load (building where needed) the ops this run needs before DeepSpeed does: DeepSpeed keeps
    a loaded op (OpBuilder._loaded_ops) and does not wait on its lock again. Each waits for its
    build directory's lock to go first, or removes it where it was left behind."""
    for builder, _ in op_builds.ops_needed(device, parallel):
        load_op(builder)


def load_op(builder_name: str) -> None:
    """Load DeepSpeed's op of ``builder_name`` (e.g. "CPUAdamBuilder"), building it where needed,
    once its build directory's lock is gone."""
    builder = get_accelerator().create_op_builder(builder_name)
    op_builds.wait_for_lock(op_builds.extensions_root() / builder.name / op_builds.LOCK)
    builder.load(verbose=False)


def restore_weight_decay(engine: "deepspeed.DeepSpeedEngine", optim: OptimConfig) -> None:
    """Give each parameter group its own weight decay again after a universal checkpoint load:
    DeepSpeed's ZeRO-3 universal loader copies the first group's hyperparameters into every
    group, which would decay the norms. Our two groups are in param_groups' order (with experts
    or Muon there are more, whose order this does not know: they are left alone)."""
    if len(engine.optimizer.param_groups) != 2:
        return
    for group, decay in zip(engine.optimizer.param_groups, (optim.weight_decay, 0.0)):
        group["weight_decay"] = decay
        group["betas"], group["eps"] = (optim.beta1, optim.beta2), optim.eps


def set_lr(engine: "deepspeed.DeepSpeedEngine", lr: float, optim: OptimConfig) -> None:
    """The schedule's learning rate for this step; Muon's matrices get it scaled to muon_lr."""
    muon_scale = optim.muon_lr / optim.lr
    for group in engine.optimizer.param_groups:
        group["lr"] = lr * muon_scale if group.get("use_muon") else lr


def share_weight(parallel: ParallelConfig, layout: ParallelLayout) -> float:
    """What backward multiplies a sequence-parallel rank's loss by. The model's loss under
    sequence parallelism is the rank's share of its window's mean (the shares sum to it), and
    the gradients are summed over the data x sequence ranks. DeepSpeed 0.19.8 divides that sum by
    the data-parallel size at ZeRO 0-2, which makes the data-parallel mean, but at ZeRO-3 its
    reduce-scatter divides by data x sequence: there the shares are weighted back up by the
    sequence-parallel size (tests/test_parallel_layouts.py holds every stage to one rank's run)."""
    return float(layout.sequence_parallel_size) if parallel.zero_stage == 3 else 1.0


def step(
    engine: "deepspeed.DeepSpeedEngine", grad_clip: float, clips_itself: bool
) -> tuple[torch.Tensor | float | None, bool]:
    """The optimizer step at the accumulation boundary, clipping the gradients' global norm to
    ``grad_clip`` (0: no clipping). Returns that norm before clipping (a tensor or a float, or
    None if unknown) and whether the update was applied: an update whose gradients hold NaN or
    inf is skipped, by DeepSpeed's optimizers at ZeRO 1-3 and in fp16/bf16, and here where
    DeepSpeed steps the torch optimizer as it is (``clips_itself``: the answer of
    dist_lm.runtime.ds_config.clips_itself for this run, which also turned DeepSpeed's clip off)."""
    if clips_itself:
        # The gradients are already all-reduced. DeepSpeed's own clip would take the norm one
        # kernel per tensor; torch's foreach kernels take it in a few, as plain PyTorch does.
        params = [p for p in engine.module.parameters() if p.grad is not None]
        if not params:
            engine.step()
            return None, True
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if grad_clip > 0:  # (a non-finite norm makes the gradients NaN: that update is skipped below)
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
        optimizer = engine.optimizer  # at ZeRO-0 with fp32 weights, the torch optimizer itself
        if getattr(optimizer, "defaults", {}).get("fused"):
            # torch's fused AdamW skips the update on the device where found_inf is set (as
            # for its GradScaler), so the host need not wait for the norm: the flag is returned
            # as a tensor, read a step later through pinned memory
            # (dist_lm.train.faults.FlagInFlight).
            nonfinite = (~torch.isfinite(norm)).float()
            optimizer.found_inf = nonfinite
            engine.step()
            return norm, nonfinite == 0
        applied = bool(torch.isfinite(norm))  # host-device sync, once per step
        if not applied:
            for p in params:
                p.grad = None  # torch's AdamW leaves a parameter without a gradient untouched
        engine.step()
        return norm, applied
    engine.step()  # DeepSpeed checks the norm for NaN/inf itself (a sync inside) and skips
    return engine.get_global_grad_norm(), engine.was_step_applied()


def first_nonfinite_grad(engine: "deepspeed.DeepSpeedEngine") -> str | None:
    """Name of the first parameter whose gradient holds NaN or inf (call after backward, before
    step, on every rank: under ZeRO-3 assembling a gradient is a collective)."""
    for name, p in engine.module.named_parameters():
        grad = safe_get_full_grad(p)
        if grad is not None and not torch.isfinite(grad).all():  # host-device sync per parameter
            return name
    return None


EXPERTS = ".deepspeed_moe.experts.deepspeed_experts."  # DeepSpeed's MoE: where a layer's local experts sit


def master_weights(
    engine: "deepspeed.DeepSpeedEngine", rank: int, world_size: int, into: HostBuffers | None = None
) -> dict[str, torch.Tensor]:
    """This rank's share of the model's full-precision weights, on the CPU, for the checkpoint's
    weights files: copies in ``into``'s buffers (an asynchronous save's), else new tensors or, on
    a CPU run, the parameters themselves. A collective: every rank calls it at the same point.

    The weights are the optimizer's fp32 masters where there are any (bf16 and fp16 keep the
    module in low precision), assembled through DeepSpeed's own accessor, which knows every
    optimizer it builds: ZeRO 1-3, BF16_Optimizer, offload. At ZeRO-0 under bf16 or fp16 the
    masters are its FP16 optimizer's fp32 copies; in fp32 at ZeRO-0 the parameters themselves.
    Each parameter is gathered by all ranks, and kept by one (index modulo world size), so that
    writing costs each rank 1/world_size of the model in host memory and disk. An expert's
    weights are kept by the first rank of its expert-data-parallel group, under the expert's
    global index (as DeepSpeed names them in its own expert files), so the files of all ranks
    hold every expert once.
    """
    fp32_copies: dict[int, torch.Tensor] = {}
    if isinstance(engine.optimizer, FP16_UnfusedOptimizer):
        fp32_copies = {
            id(low): high
            for lows, highs in zip(engine.optimizer.fp16_groups, engine.optimizer.fp32_groups)
            for low, high in zip(lows, highs)
        }
    moe_layers = {name + EXPERTS: layer for name, layer in engine.module.named_modules() if isinstance(layer, MoE)}
    owned: dict[str, torch.Tensor] = {}

    def keep(key: str, full: torch.Tensor) -> None:  # on the host at once: the next gather may need the room
        fp32 = full.detach().float()
        owned[key] = into.copy(("weights", key), fp32) if into is not None else fp32.cpu()

    modules = dict(engine.module.named_modules())
    for i, (name, param) in enumerate(engine.module.named_parameters()):
        full = safe_get_full_fp32_param(param)  # ZeRO 1-3: gathered over the parameter's group
        if full is None:
            full = fp32_copies.get(id(param), param)
        if getattr(param, DS_TENSOR_MODEL_PARALLEL, False):  # AutoTP's shard: gathered over its ranks
            full = _whole_layer_weight(full, modules[name.rpartition(".")[0]])
        if getattr(param, "allreduce", True) is False:  # an expert: this rank holds its own experts
            if groups._get_expert_data_parallel_rank(param.group_name) == 0:
                keep(_global_expert_name(name, moe_layers), full)
        elif i % world_size == rank:
            keep(name, full)
    return owned


def _whole_layer_weight(shard: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    """A tensor-parallel linear layer's weight from every rank's equal shard (dist_lm.config.layout
    checks the widths divide): a row-parallel layer (LinearAllreduce) splits its inputs (dim 1),
    a column-parallel one its outputs (dim 0). A collective over the layer's group."""
    shards = [torch.empty_like(shard) for _ in range(dist.get_world_size(layer.mp_group))]
    dist.all_gather(shards, shard.contiguous(), group=layer.mp_group)
    return torch.cat(shards, dim=1 if isinstance(layer, LinearAllreduce) else 0)


def _global_expert_name(name: str, moe_layers: dict[str, MoE]) -> str:
    prefix = next(p for p in moe_layers if name.startswith(p))
    layer = moe_layers[prefix]
    local, rest = re.match(r"(\d+)(\..*)", name[len(prefix) :]).groups()
    first = groups._get_expert_parallel_rank(layer.expert_group_name) * layer.num_local_experts
    return f"{prefix}{first + int(local)}{rest}"


def tied_names(module: torch.nn.Module) -> dict[str, str]:
    """Names in the module's state dict that share another name's parameter (tied embeddings):
    {alias: name}, name being the one named_parameters() gives."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first.setdefault(id(tensor), name)
    return aliases


def tensor_bytes(state_dict) -> int:
    """The bytes of every tensor in a state dict."""
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(state_dict) if isinstance(t, torch.Tensor))


class StagingEngine(CheckpointEngine):
    """DeepSpeed's checkpoint engine of this run, but while ``staged`` is a list, ``save`` copies
    the state dict to host memory and adds it there instead of writing it; where the node's
    memory would not keep its reserve (each of its ``ranks_per_node`` ranks copying as much at
    once), it writes the state dict in place and adds (its path, its bytes) to ``written``. The
    copies go into ``buffers``, kept from one save to the next (dist_lm.runtime.host_buffers):
    only what they do not hold yet counts against the reserve."""

    def __init__(self, inner: CheckpointEngine, ranks_per_node: int):
        super().__init__()
        self.inner, self.name = inner, f"staging {inner.name}"
        self.ranks_per_node = ranks_per_node
        self.buffers = HostBuffers()
        self.staged: list[tuple[Any, str]] | None = None
        self.written: list[tuple[str, int]] = []

    def create(self, info: CheckpointCommitInfo):
        return self.inner.create(info)

    def save(self, state_dict, path: str):
        if self.staged is None:
            return self.inner.save(state_dict, path)
        leaves, spec = pytree.tree_flatten(state_dict)
        # a tensor's key: its file (the same name in every checkpoint) and its place in the file
        keys = [(os.path.basename(path), i) for i in range(len(leaves))]
        tensors = [(key, t) for key, t in zip(keys, leaves) if isinstance(t, torch.Tensor)]
        if not host_memory_for(self.buffers.bytes_to_allocate(tensors) * self.ranks_per_node):
            self.written.append((path, tensor_bytes(leaves)))
            return self.inner.save(state_dict, path)
        # a copy even of what is in host memory already: the optimizer updates it in place while
        # the thread writes
        copies = [self.buffers.copy(key, t) if isinstance(t, torch.Tensor) else t for key, t in zip(keys, leaves)]
        self.staged.append((pytree.tree_unflatten(copies, spec), path))

    def load(self, path: str, map_location=None):
        return self.inner.load(path, map_location)

    def commit(self, info: CheckpointCommitInfo):
        return self.inner.commit(info)

    def is_data_parallel_writer(self, dp_rank):
        return self.inner.is_data_parallel_writer(dp_rank)

    def preserves_storage_sharing(self):
        return False  # each tensor is copied on its own: no flat buffer travels whole


def install_staging(engine: "deepspeed.DeepSpeedEngine", ranks_per_node: int) -> StagingEngine:
    """Put a staging engine in front of DeepSpeed's checkpoint engine (once, at start-up):
    checkpoint.async_save (dist_lm.train.async_checkpoint)."""
    staging = StagingEngine(engine.checkpoint_engine, ranks_per_node)
    engine.checkpoint_engine = staging
    return staging
