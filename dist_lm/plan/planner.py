"""``--config auto``: pick the preset and the parallel settings that fit the machine.

The plan chooses the model preset, precision, ZeRO stage, offload, activation checkpointing,
micro-batch and (through the global batch) gradient accumulation. Every key the user set on
the command line is a constraint the plan works around, never a value it replaces. The plan
is explicit: it lists the overrides it chose and why, and the command that reproduces it
without ``auto``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from dist_lm.config.batch import batch_sizes, global_batch_size, rounded_up
from dist_lm.config.errors import ConfigError
from dist_lm.config.io import load_config, parse_override
from dist_lm.config.layout import ParallelLayout, parallel_layout
from dist_lm.config.schema import Config, UserError, replaced
from dist_lm.data.checks import vocab_size_for
from dist_lm.model.counts import count_parameters
from dist_lm.plan.memory import GB, MemoryEstimate, estimate
from dist_lm.plan.scaling import node_checkpoint_bytes
from dist_lm.plan.sizing import (
    HEADROOM_FIXED_GB,
    HEADROOM_FRACTION,
    MAX_STEP_SECONDS,
    MFU_ASSUMED,
    regional_compile_gain,
    step_seconds,
    usable_gb,
)
from dist_lm.runtime.hardware import HOST_MEMORY_RESERVE, Machine
from dist_lm.runtime.precision import Precision

# Model presets for GPUs, largest first; "debug" is the CPU plan.
GPU_PRESETS = ("h100-multinode", "h100-80gb", "rtx-24gb", "rtx-12gb")
CPU_PRESET = "debug"
MICRO_BATCHES = (32, 16, 8, 4, 2, 1)

# Memory-saving settings from fastest to slowest. Offload comes last and only for the smallest
# preset: a model that only fits with the optimizer on the CPU is better served by a smaller one.
STRATEGIES: tuple[dict, ...] = (
    {"zero_stage": 1, "activation_checkpointing": False},
    {"zero_stage": 2, "activation_checkpointing": False},
    {"zero_stage": 1, "activation_checkpointing": True},
    {"zero_stage": 2, "activation_checkpointing": True},
    {"zero_stage": 3, "activation_checkpointing": True},
)
# Their reduction buckets are made smaller too: DeepSpeed allocates them whole (2 x 500M
# elements by default, 2 GB in bf16), which a card this small cannot spare.
SMALL_BUCKETS = {"reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000}
OFFLOAD_STRATEGIES: tuple[dict, ...] = (
    {"zero_stage": 2, "activation_checkpointing": True, "offload_optimizer": True, **SMALL_BUCKETS},
    {
        "zero_stage": 3,
        "activation_checkpointing": True,
        "offload_optimizer": True,
        "offload_params": True,
        **SMALL_BUCKETS,
    },
)


@dataclass
class Plan:
    machine: Machine
    world_size: int
    preset: str
    config: Config
    choices: list[str]
    """The dotted overrides the plan chose, in the order they are applied (before the user's)."""
    user_overrides: list[str]
    reasons: list[str] = field(default_factory=list)
    memory: MemoryEstimate | None = None

    @property
    def budget_gb(self) -> float:
        return usable_gb(self.machine)

    def explicit_args(self) -> list[str]:
        """Launcher arguments that reproduce this plan without auto-detection."""
        return ["--config", self.preset, *self.choices, *self.user_overrides]

    @property
    def precision(self) -> Precision:
        """The plan's precision (bf16 where the config leaves it to start-up)."""
        precision = self.config.parallel.precision
        return Precision(precision) if precision != "auto" else Precision.BF16

    def summary(self) -> list[str]:
        lines = [f"machine: {self.machine.describe()}", f"plan: preset {self.preset}, {self.world_size} rank(s)"]
        lines += [f"  {r}" for r in self.reasons]
        if self.memory is not None:
            lines.append(
                f"  predicted peak memory per GPU {self.memory.describe()}; "
                f"budget {self.budget_gb:.1f} GB of {self.machine.gpu_mem_gb:g} GB"
            )
        if self.config.checkpoint.saves_async(self.machine.has_gpu):
            lines.append(f"  {self.async_save_memory()}")
        return lines

    def async_save_memory(self) -> str:
        """What checkpoint.async_save's copies take of a node's host memory: each rank of the node
        copies its share of a save into host buffers it keeps for the run
        (dist_lm.runtime.host_buffers), and the busiest node holds the ranks that save the model
        states."""
        cfg = replaced(self.config, "model", vocab_size=vocab_size_for(self.config))
        layout = parallel_layout(cfg.parallel, cfg.model, self.world_size)
        ranks = min(self.world_size, self.machine.gpus_per_node or 1)
        per_node = node_checkpoint_bytes(cfg, layout, self.precision, ranks) / GB
        room = (1 - HOST_MEMORY_RESERVE) * self.machine.ram_gb
        line = (
            f"checkpoint.async_save: its copies hold up to {per_node:.1f} GB of host memory per node "
            f"({ranks} rank(s)) from the first save on, of {self.machine.ram_gb:g} GB"
        )
        if per_node > room:
            line += (
                f"; more than {room:.0f} GB would leave less than {HOST_MEMORY_RESERVE:.0%} free, so the ranks "
                "write what does not fit in place and training waits for it as for a synchronous save"
            )
        return line


def _keys(overrides: list[str]) -> set[str]:
    return {parse_override(o)[0] for o in overrides}


def _with(cfg: Config, parallel: dict, micro: int, global_batch: int | None) -> Config:
    return dataclasses.replace(
        cfg,
        parallel=dataclasses.replace(cfg.parallel, **parallel),
        train=dataclasses.replace(cfg.train, micro_batch_size=micro, global_batch_size=global_batch),
    )


def make_plan(
    machine: Machine,
    overrides: list[str] = (),
    world_size: int | None = None,
    resumed: tuple[Precision, int | None] | None = None,
    decided: list[str] = (),
) -> Plan:
    """The plan for ``machine``; ``world_size`` defaults to one rank per GPU. ``resumed``: the
    precision and ZeRO stage of the checkpoint the run resumes (dist_lm.train.restore.resumed_settings).
    ``decided``: settings another part of the planner chose (dist_lm.plan.ranking), kept as the
    user's are but listed with the plan's own choices."""
    given = list(overrides)
    kept = settings_to_keep(resumed, _keys(given))
    fixed = kept + given
    plan = _make_plan(machine, [*decided, *fixed], world_size or machine.world_size, allow_autocast=resumed is None)
    if decided:
        plan.choices += decided
        plan.user_overrides = fixed
    if plan.machine.has_gpu and fixed:
        plan.reasons.append(f"kept as given: {', '.join(sorted(_keys(fixed)))}")
    if kept:
        plan.reasons.append(f"kept from the checkpoint it resumes, whose state loads only so: {' '.join(kept)}")
    return plan


def settings_to_keep(resumed: tuple[Precision, int | None] | None, given: set[str]) -> list[str]:
    """The overrides a resumed checkpoint imposes where the user gave none: ZeRO-0 state does not
    convert to another stage, nor bf16-autocast's fp32 weights and torch optimizer state to a
    low-precision one (dist_lm.train.restore: needs_universal, check_precision)."""
    if resumed is None:
        return []
    precision, stage = resumed
    keep = {"parallel.precision": precision.value} if precision is Precision.BF16_AUTOCAST else {}
    if stage == 0:
        keep["parallel.zero_stage"] = 0
    return [f"{key}={value}" for key, value in keep.items() if key not in given]


def _make_plan(machine: Machine, overrides: list[str], world: int, allow_autocast: bool) -> Plan:
    if not machine.has_gpu:
        cfg = load_config(CPU_PRESET, overrides)
        plan = Plan(machine, world, CPU_PRESET, cfg, [], overrides)
        plan.reasons.append(f"no GPU: the {CPU_PRESET} preset, in fp32 on the CPU (a pipeline check, not a real run)")
        return plan
    fixed = _keys(overrides)
    for preset in GPU_PRESETS:
        plan = _plan_preset(preset, machine, overrides, fixed, world, STRATEGIES, allow_autocast)
        if plan is not None:
            return plan
    plan = _plan_preset(
        GPU_PRESETS[-1], machine, overrides, fixed, world, OFFLOAD_STRATEGIES, allow_autocast, check_speed=False
    )
    if plan is not None:
        return plan
    smallest = load_config(GPU_PRESETS[-1], overrides)
    smallest = replaced(smallest, "model", vocab_size=vocab_size_for(smallest))
    need = estimate(
        smallest.model, dataclasses.replace(smallest.parallel, **OFFLOAD_STRATEGIES[-1]), Precision.BF16, 1, world
    )
    raise UserError(
        f"plan: nothing fits in {max(usable_gb(machine), 0):.1f} GB of each {machine.gpu_mem_gb:g} GB GPU "
        f"({HEADROOM_FRACTION:.0%} and {HEADROOM_FIXED_GB} GB are kept free); the smallest preset "
        f"({GPU_PRESETS[-1]}) needs {need.total / GB:.1f} GB even with micro-batch 1 and offload; "
        "use a smaller model (model.d_model=..., model.n_layers=...) or --config debug"
    )


def _plan_preset(
    preset: str,
    machine: Machine,
    overrides: list[str],
    fixed: set[str],
    world: int,
    strategies: tuple[dict, ...],
    allow_autocast: bool,
    check_speed: bool = True,
) -> Plan | None:
    cfg = load_config(preset, overrides)
    cfg = replaced(cfg, "model", vocab_size=vocab_size_for(cfg))
    reasons: list[str] = []
    if check_speed and preset != GPU_PRESETS[-1]:
        seconds = step_seconds(cfg, machine, world)
        if seconds is not None and seconds > MAX_STEP_SECONDS:
            return None
    precision = cfg.parallel.precision
    best, why = Precision.for_gpu(machine.bf16)  # the trainer's policy for auto (Precision.resolve)
    if "parallel.precision" not in fixed:
        precision = best
        reasons.append(f"precision {precision}: {why}")
    resolved = best if precision == "auto" else Precision(precision)
    if resolved is Precision.FP8:
        if machine.fp8 is False:
            raise UserError(
                f"plan: parallel.precision=fp8 needs GPUs with float8 tensor cores (compute capability "
                f"8.9 or more: Ada, Hopper), which {machine.gpu_name or 'these GPUs'} lack: use bf16 or auto"
            )
        known = "" if machine.fp8 else " (whether these GPUs have float8 tensor cores is unknown: the run checks)"
        reasons.append(f"precision fp8 (as given): memory counted as bf16, speed estimated at the bf16 peak{known}")

    # One GPU at ZeRO 0-1 shards nothing. There, with every micro-batch an optimizer step, fp32
    # weights under torch.autocast stepped by torch's fused AdamW (bf16-autocast at ZeRO-0) train
    # faster than DeepSpeed's bf16 optimizer, whose per-step copies then count (1.09x at 124M);
    # accumulating, bf16's lighter micro-batches win (0.97x at 64 micro-batches a step:
    # docs/benchmarks.md). Not when the user chose the precision or the stage, nor when the run
    # resumes a checkpoint (make_plan keeps what its state needs).
    autocast = (
        allow_autocast
        and world == 1
        and resolved is Precision.BF16
        and not fixed & {"parallel.precision", "parallel.zero_stage"}
    )

    budget = usable_gb(machine) * GB
    for layout in _layouts(cfg, world, fixed):
        plan = _fit(
            preset, machine, cfg, layout, strategies, fixed, overrides, reasons, resolved, precision, autocast, budget
        )
        if plan is not None:
            return plan
    return None


def _layouts(cfg: Config, world: int, fixed: set[str]) -> list[ParallelLayout]:
    """The layouts to try, in order: all ranks data-parallel first (the fastest), then windows
    split over more and more sequence-parallel ranks, as far as the model allows
    (dist_lm.config.layout); only the user's when they set parallel.sequence_parallel_size or
    parallel.tensor_parallel_size (the two do not combine; the plan does not choose the latter)."""
    if fixed & {"parallel.sequence_parallel_size", "parallel.tensor_parallel_size"}:
        return [parallel_layout(cfg.parallel, cfg.model, world)]
    layouts = []
    for size in (1, 2, 4, 8, 16, 32, 64):
        try:
            layouts.append(
                parallel_layout(replaced(cfg, "parallel", sequence_parallel_size=size).parallel, cfg.model, world)
            )
        except ConfigError:
            break  # a size that does not divide the ranks, the heads or the window: no larger one does
    return layouts


def _fit(
    preset: str,
    machine: Machine,
    cfg: Config,
    layout: ParallelLayout,
    strategies: tuple[dict, ...],
    fixed: set[str],
    overrides: list[str],
    reasons: list[str],
    resolved: Precision,
    precision: str,
    autocast: bool,
    budget: float,
) -> Plan | None:
    """The fastest strategy and micro-batch of ``strategies`` that fit ``budget`` on ``layout``."""
    world, dp = layout.world_size, layout.dp_size
    global_batch = cfg.train.global_batch_size
    per_rank = global_batch_size(cfg.train, dp) // dp
    micros = (
        [cfg.train.micro_batch_size]
        if "train.micro_batch_size" in fixed
        else [m for m in MICRO_BATCHES if m <= max(per_rank, 1)]
    )
    seen: set[tuple] = set()
    for strategy in strategies:
        parallel = {k: v for k, v in strategy.items() if f"parallel.{k}" not in fixed}
        if world == 1 and parallel.get("zero_stage", 0) >= 2 and not parallel.get("offload_optimizer"):
            continue  # one rank: stages 2 and 3 shard nothing
        autocast_here = autocast and parallel.get("zero_stage") == 1 and not parallel.get("offload_optimizer")
        key = tuple(sorted(parallel.items()))
        if key in seen:
            continue
        seen.add(key)
        # Without activation checkpointing a micro-batch of 1 or 2 is slower than recomputing
        # with a larger one; the later strategies take any micro-batch that fits.
        smallest = 1 if _merged(cfg, parallel)["activation_checkpointing"] else min(4, per_rank)
        for micro in micros:
            if micro < smallest and "train.micro_batch_size" not in fixed:
                break
            if (
                global_batch is not None
                and rounded_up(global_batch, micro, dp) != global_batch
                and "train.global_batch_size" in fixed
            ):
                continue
            one_micro_batch_a_step = global_batch is None or rounded_up(global_batch, micro, dp) == micro * dp
            use_autocast = autocast_here and one_micro_batch_a_step
            trial_parallel = {**parallel, "zero_stage": 0} if use_autocast else parallel
            if layout.sequence_parallel_size > 1 and "parallel.sequence_parallel_size" not in fixed:
                trial_parallel = {**trial_parallel, "sequence_parallel_size": layout.sequence_parallel_size}
            trial_resolved = Precision.BF16_AUTOCAST if use_autocast else resolved
            # With ZeRO++ hpZ where the plan spans nodes, if its secondary copy fits; else without:
            # it speeds the gathers, and is never the reason a setting is passed over.
            hpz = _hpz_group(machine, layout, _merged(cfg, trial_parallel), fixed)
            for with_hpz in [True, False] if hpz else [False]:
                trial_here = {**trial_parallel, "zero_hpz_partition_size": hpz} if with_hpz else trial_parallel
                trial = _with(cfg, trial_here, micro, global_batch)
                mem = estimate(
                    trial.model, trial.parallel, trial_resolved, micro, layout, z_loss=trial.optim.z_loss > 0
                )
                if mem.total <= budget:
                    trial_parallel, hpz = trial_here, hpz if with_hpz else 0
                    break
            else:
                continue
            reasons = list(reasons)
            regional = regional_compile_gain(trial, trial_resolved, world, fixed)
            if regional is not None:
                trial_parallel = {**trial_parallel, "compile_regions": True}
                trial = _with(trial, trial_parallel, micro, global_batch)
                reasons.append(
                    f"compiled by regions: the run's {regional[0]:,} micro-batches end about "
                    f"{regional[1]:.0f} s sooner than with the whole model compiled, whose faster "
                    "steps repay its slower first one only over longer runs"
                )
            if use_autocast:
                reasons.append(
                    "bf16-autocast at ZeRO stage 0: one GPU shards nothing, and with every micro-batch "
                    "a step, fp32 weights under torch.autocast with torch's fused AdamW step faster than "
                    "DeepSpeed's bf16 optimizer (its checkpoints resume at ZeRO stage 0 on any number "
                    "of GPUs)"
                )
            if hpz:
                reasons.append(
                    f"ZeRO++ hpZ in groups of {hpz}, a node's GPUs: ZeRO-3's backward gathers its weights "
                    f"inside each node, not across the link between nodes, for 1/{hpz} of the weights more "
                    "on each GPU (docs/parallelism.md)"
                )
            if "sequence_parallel_size" in trial_parallel:
                reasons.append(
                    f"sequence parallel size {layout.sequence_parallel_size}: a window of "
                    f"{cfg.model.seq_len:,} tokens does not fit one GPU with any setting above; split over "
                    f"{layout.sequence_parallel_size} ranks (DeepSpeed's Ulysses) it does, leaving "
                    f"{dp} data-parallel ranks (docs/parallelism.md)"
                )
            return _finish(
                preset,
                machine,
                layout,
                trial,
                mem,
                trial_parallel,
                trial_resolved.value if use_autocast else precision,
                fixed,
                overrides,
                reasons,
            )
    return None


def _hpz_group(machine: Machine, layout: ParallelLayout, parallel: dict, fixed: set[str]) -> int:
    """ZeRO++ hpZ's group for a ZeRO-3 plan that spans nodes (a node's GPUs), or 0: none."""
    if (
        parallel["zero_stage"] != 3
        or machine.nodes < 2
        or "parallel.zero_hpz_partition_size" in fixed
        or layout.sequence_parallel_size * layout.tensor_parallel_size > 1
        or layout.world_size % machine.gpus_per_node
    ):
        return 0
    return machine.gpus_per_node


def _merged(cfg: Config, parallel: dict) -> dict:
    return {**dataclasses.asdict(cfg.parallel), **parallel}


def _finish(
    preset: str,
    machine: Machine,
    layout: ParallelLayout,
    cfg: Config,
    mem: MemoryEstimate,
    parallel: dict,
    precision: str,
    fixed: set[str],
    overrides: list[str],
    reasons: list[str],
) -> Plan:
    choices = []
    if "parallel.precision" not in fixed:
        choices.append(f"parallel.precision={precision}")
    for key, value in parallel.items():
        choices.append(f"parallel.{key}={str(value).lower()}")
    micro = cfg.train.micro_batch_size
    if "train.micro_batch_size" not in fixed:
        choices.append(f"train.micro_batch_size={micro}")
    global_batch, world, dp = cfg.train.global_batch_size, layout.world_size, layout.dp_size
    if global_batch is not None and rounded_up(global_batch, micro, dp) != global_batch:
        rounded = rounded_up(global_batch, micro, dp)
        reasons.append(
            f"global batch {global_batch} is not a multiple of micro-batch x data-parallel ranks = {micro * dp}: "
            f"{rounded} instead"
        )
        choices.append(f"train.global_batch_size={rounded}")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch_size=rounded))
    params = count_parameters(cfg.model)["total"]
    p = cfg.parallel
    how = (
        f"ZeRO stage {p.zero_stage}"
        + (", activation checkpointing" if p.activation_checkpointing else "")
        + (", optimizer on the CPU" if p.offload_optimizer else "")
        + (", parameters on the CPU" if p.offload_params else "")
        + (f", reduction buckets of {p.reduce_bucket_size:,} elements" if "reduce_bucket_size" in parallel else "")
    )
    reasons.insert(
        0,
        f"model {params / 1e6:.0f}M parameters (the largest preset that fits and steps in under "
        f"{MAX_STEP_SECONDS:.0f} s at {MFU_ASSUMED:.0%} MFU)",
    )
    reasons.append(f"{how}, micro-batch {micro}: the fastest settings that fit")
    batch = batch_sizes(cfg.train, dp)
    reasons.append(
        f"global batch {batch.global_batch_size} = micro {micro} x accumulation "
        f"{batch.grad_accum_steps} x data-parallel ranks {dp}"
    )
    # Rebuild through the loader so the result is exactly what the explicit command gives.
    final = load_config(preset, choices + overrides)
    return Plan(machine, world, preset, final, choices, overrides, reasons, mem)


def plan_for_this_machine(
    overrides: list[str], nodes: int, world_size: int | None, resumed: tuple[Precision, int | None] | None = None
) -> Plan:
    """The plan for the machine we run on (imports torch to look at the GPUs)."""
    from dist_lm.runtime.hardware import detect_machine

    return make_plan(detect_machine(nodes), overrides, world_size, resumed)
