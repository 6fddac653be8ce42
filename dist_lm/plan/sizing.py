"""How much a plan may use and how long its steps take: the memory budget of a GPU, the search
for the largest micro-batch that fits, a step's predicted time, and when compiling by regions
ends a run sooner than compiling the whole model."""

from __future__ import annotations

from typing import Callable

from dist_lm.config.batch import global_batch_size, rounded_up
from dist_lm.config.schema import Config
from dist_lm.model.counts import flops_per_token
from dist_lm.runtime.hardware import Machine
from dist_lm.runtime.precision import Precision

# A preset is too big for the machine when one optimizer step of its global batch would take
# longer than this at MFU_ASSUMED: the run would crawl even though it fits in memory.
MAX_STEP_SECONDS = 60.0


MFU_ASSUMED = 0.4


# Keep this much of each GPU free: the CUDA context, NCCL and the allocator's slack are not in
# the estimate (which is what torch.cuda.max_memory_allocated reports).
HEADROOM_FRACTION = 0.10


HEADROOM_FIXED_GB = 1.5


# Compiling by regions (parallel.compile_regions: one block's graph serves them all) reaches the
# first step sooner and adds host work to every micro-batch. On one H200 (docs/benchmarks.md,
# "First step") the 1.1B plan's first step came 44 s sooner (41.9 s against 86.4 s: 23 of its 24
# blocks not compiled again; an earlier run of the same plan saved 38 s, so 1.6 s a block is the
# lower of the two), while each micro-batch took about 10 ms longer (0.9% of that plan's 14.4 s
# step, 4% at 1.3B with micro-batch 8, a quarter at 124M).
REGIONAL_SAVES_PER_BLOCK_S = 1.6


REGIONAL_COSTS_PER_MICRO_BATCH_S = 0.010


def usable_gb(machine: Machine) -> float:
    return machine.gpu_mem_gb * (1 - HEADROOM_FRACTION) - HEADROOM_FIXED_GB


def largest_fitting(fits: Callable[[int], bool], start: int, limit: int) -> int:
    """The largest n in 1..limit for which ``fits(n)`` holds, 0 if none, for a ``fits`` that
    holds up to some n and not beyond (memory grows with the micro-batch): doubling from
    ``start`` (or halving, if it does not fit), then bisecting. Each size is tried once."""
    good, bad = 0, limit + 1
    n = min(max(start, 1), limit)
    if fits(n):
        good = n
        while bad > limit and good < limit:  # double until a size does not fit
            n = min(2 * good, limit)
            if fits(n):
                good = n
            else:
                bad = n
    else:
        bad = n
        while good == 0 and bad > 1:  # halve until a size fits
            n = bad // 2
            if fits(n):
                good = n
            else:
                bad = n
    while bad - good > 1 and good:
        n = (good + bad) // 2
        if fits(n):
            good = n
        else:
            bad = n
    return good


def step_seconds(cfg: Config, machine: Machine, world_size: int) -> float | None:
    """Time of one optimizer step at MFU_ASSUMED, or None when the GPU's peak is unknown."""
    if machine.peak_flops is None:
        return None
    tokens = global_batch_size(cfg.train, world_size) * cfg.model.seq_len
    return flops_per_token(cfg.model) * tokens / (world_size * machine.peak_flops * MFU_ASSUMED)


def regional_compile_gain(cfg: Config, precision: Precision, world: int, fixed: set[str]) -> tuple[int, float] | None:
    """(micro-batches in the run, seconds saved) when compiling by regions ends this run sooner
    than compiling the whole model, else None. Only where it was measured on the GPU: one GPU,
    compiled at ZeRO 0-2 without activation checkpointing, in DeepSpeed's precisions (not
    bf16-autocast); and only where the user set neither compile key."""
    p = cfg.parallel
    if (
        world != 1
        or not p.compile
        or p.zero_stage >= 3
        or p.activation_checkpointing
        or precision is Precision.BF16_AUTOCAST
        or fixed & {"parallel.compile", "parallel.compile_regions"}
    ):
        return None
    per_step = global_batch_size(cfg.train, world)
    steps = cfg.train.max_steps
    if cfg.train.max_tokens is not None:
        steps = min(steps, -(-cfg.train.max_tokens // (per_step * cfg.model.seq_len)))
    micro_batches = steps * rounded_up(per_step, cfg.train.micro_batch_size, world) // cfg.train.micro_batch_size
    gain = (cfg.model.n_layers - 1) * REGIONAL_SAVES_PER_BLOCK_S - micro_batches * REGIONAL_COSTS_PER_MICRO_BATCH_S
    return (micro_batches, gain) if gain > 0 else None
