"""`dist-lm plan --link`: every layout of the plan's model that fits the cluster, ranked by the
scaling model's step time (dist_lm.plan.scaling), with its tokens/s per GPU, its scaling
efficiency against one node and its cost in GPU-hours.

The memory plan (dist_lm.plan.planner) picks the model and the first settings that fit; this
weighs the alternatives by speed: ZeRO stages 1-3, activation checkpointing, sequence- or
tensor-parallel groups, and for ZeRO-3 across nodes ZeRO++ (hpZ within a node, qwZ and qgZ on the
wire). Each at the largest micro-batch that fits. A key the user set is kept, as in the plan.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from dist_lm.config.batch import rounded_up
from dist_lm.config.errors import ConfigError
from dist_lm.config.layout import ParallelLayout, parallel_layout
from dist_lm.config.schema import Config, replaced
from dist_lm.data.checks import vocab_size_for
from dist_lm.plan.memory import GB, estimate
from dist_lm.plan.planner import MICRO_BATCHES, Plan
from dist_lm.plan.scaling import Cluster, Link, StepTime, step_time
from dist_lm.plan.sizing import usable_gb
from dist_lm.runtime.precision import Precision

SIZES = (1, 2, 4, 8, 16, 32, 64)
# ZeRO++'s qwZ and qgZ put int8 weights and int4 gradients on the wire: not what the run computes
# otherwise. The plan takes them only where they make the step at least this much shorter.
QUANTIZED_MIN_GAIN = 0.05
ALWAYS = ("zero_stage", "activation_checkpointing")  # named in a candidate's overrides even at their defaults


@dataclass(frozen=True)
class Candidate:
    parallel: dict
    """The parallel keys this candidate sets."""
    micro_batch_size: int
    layout: ParallelLayout
    memory_gb: float
    step: StepTime
    one_node: StepTime | None
    """The same settings and per-rank batch on one node (None on one node, or where they do not fit it)."""

    @property
    def overrides(self) -> list[str]:
        """The dotted keys that give this candidate (those at their defaults left out)."""
        keys = [f"parallel.{k}={str(v).lower()}" for k, v in self.parallel.items() if k in ALWAYS or not _off(v)]
        return keys + [f"train.micro_batch_size={self.micro_batch_size}"]

    @property
    def scaling_efficiency(self) -> float | None:
        if self.one_node is None:
            return None
        return self.step.tokens_per_s_per_gpu / self.one_node.tokens_per_s_per_gpu

    def describe(self) -> str:
        p = self.parallel
        parts = [f"ZeRO-{p['zero_stage']}"]
        if p.get("zero_hpz_partition_size", 1) > 1:
            parts.append(f"hpZ {p['zero_hpz_partition_size']}")
        if p.get("zero_quantized_weights"):
            parts.append("qwZ+qgZ")
        if self.layout.sequence_parallel_size > 1:
            parts.append(f"SP {self.layout.sequence_parallel_size}")
        if self.layout.tensor_parallel_size > 1:
            parts.append(f"TP {self.layout.tensor_parallel_size}")
        if p["activation_checkpointing"]:
            parts.append("AC")
        return " ".join(parts) + f", micro {self.micro_batch_size}"


def _off(value: bool | int) -> bool:
    """A size of 1 or a False switch: the parallel keys' defaults (True is no size of 1)."""
    return value is False or (type(value) is int and value == 1)


def rank_layouts(plan: Plan, link: Link, fixed: set[str]) -> list[Candidate]:
    """The candidates that fit, fastest first (ties in a fixed order). ``fixed``: the dotted keys
    the user set, which every candidate keeps."""
    machine = plan.machine
    cfg = replaced(plan.config, "model", vocab_size=vocab_size_for(plan.config))
    cluster = Cluster(machine.nodes, machine.gpus_per_node, machine.gpu_name, link)
    precision = plan.precision
    budget = usable_gb(machine) * GB
    found = []
    for parallel in _settings(cfg, cluster, fixed):
        trial = _with_parallel(cfg, parallel)
        try:
            layout = parallel_layout(trial.parallel, trial.model, cluster.world_size)
        except ConfigError:
            continue
        micro = _largest_micro(trial, layout, precision, budget, fixed)
        if micro is None:
            continue
        trial = _with_micro(trial, micro)
        memory = estimate(trial.model, trial.parallel, precision, micro, layout, z_loss=trial.optim.z_loss > 0)
        step = step_time(trial, layout, cluster, precision)
        found.append(
            Candidate(parallel, micro, layout, memory.total / GB, step, _one_node(trial, layout, cluster, precision))
        )
    found.sort(key=lambda c: (round(c.step.seconds, 9), c.describe()))
    return found


def _settings(cfg: Config, cluster: Cluster, fixed: set[str]) -> list[dict]:
    """Every combination of the keys this ranking varies, less those the user fixed."""
    p = cfg.parallel

    def choices(key: str, values: list) -> list:
        return [getattr(p, key)] if f"parallel.{key}" in fixed else values

    stages = choices("zero_stage", [1, 2, 3] if cluster.world_size > 1 else [1])
    checkpointing = choices("activation_checkpointing", [False, True])
    sequence = choices("sequence_parallel_size", [s for s in SIZES if s <= cluster.world_size])
    tensor = choices("tensor_parallel_size", [t for t in SIZES if t <= cluster.gpus_per_node])
    out = []
    for stage, ac, sp, tp in itertools.product(stages, checkpointing, sequence, tensor):
        if sp > 1 and tp > 1:
            continue
        base = {
            "zero_stage": stage,
            "activation_checkpointing": ac,
            "sequence_parallel_size": sp,
            "tensor_parallel_size": tp,
        }
        plus = [{}]
        if stage == 3 and cluster.nodes > 1 and sp * tp == 1:
            hpz = choices("zero_hpz_partition_size", [1, cluster.gpus_per_node])
            quantized = choices("zero_quantized_weights", [False, True])
            plus = [
                {"zero_hpz_partition_size": h, "zero_quantized_weights": q, "zero_quantized_gradients": q}
                for h, q in itertools.product(hpz, quantized)
            ]
        out += [{**base, **extra} for extra in plus]
    return out


def _largest_micro(
    cfg: Config, layout: ParallelLayout, precision: Precision, budget: float, fixed: set[str]
) -> int | None:
    dp, global_batch = layout.dp_size, cfg.train.global_batch_size
    micros = [cfg.train.micro_batch_size] if "train.micro_batch_size" in fixed else list(MICRO_BATCHES)
    for micro in micros:
        if global_batch is not None and rounded_up(global_batch, micro, dp) != global_batch:
            continue
        mem = estimate(cfg.model, cfg.parallel, precision, micro, layout, z_loss=cfg.optim.z_loss > 0)
        if mem.total <= budget:
            return micro
    return None


def _one_node(cfg: Config, layout: ParallelLayout, cluster: Cluster, precision: Precision) -> StepTime | None:
    """The same per-rank micro-batch and accumulation on one node of the cluster (weak scaling)."""
    if cluster.nodes == 1:
        return None
    one = Cluster(1, cluster.gpus_per_node, cluster.gpu_name, cluster.link)
    hpz = cfg.parallel.zero_hpz_partition_size
    try:
        small_layout = parallel_layout(
            dataclasses.replace(cfg.parallel, zero_hpz_partition_size=1 if one.world_size % hpz else hpz),
            cfg.model,
            one.world_size,
        )
    except ConfigError:
        return None
    if cfg.train.global_batch_size is None:
        small = cfg
    else:
        scaled = cfg.train.global_batch_size * small_layout.dp_size // layout.dp_size
        if scaled < cfg.train.micro_batch_size * small_layout.dp_size:
            return None
        small = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch_size=scaled))
    return step_time(small, small_layout, one, precision)


def _with_parallel(cfg: Config, parallel: dict) -> Config:
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **parallel))


def _with_micro(cfg: Config, micro: int) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=micro))


def ranking_table(candidates: list[Candidate], max_tokens: int, shown: int = 8) -> list[str]:
    """The fastest ``shown`` candidates as printed by dist-lm plan --link."""
    lines = [
        f"  {'layout':<34} {'memory':>7} {'step':>8} {'compute':>8} {'comm':>7} {'ckpt':>6} "
        f"{'tok/s/GPU':>10} {'vs 1 node':>9} {'GPU-hours':>10}"
    ]
    for c in candidates[:shown]:
        s = c.step
        eff = c.scaling_efficiency
        hours = max_tokens / s.tokens_per_s_per_gpu / 3600
        lines.append(
            f"  {c.describe():<34} {c.memory_gb:>5.1f}GB {s.seconds:>7.2f}s {s.compute:>7.2f}s "
            f"{sum(s.exposed.values()):>6.2f}s {s.checkpoint:>5.2f}s {s.tokens_per_s_per_gpu:>10,.0f} "
            f"{(f'{eff:.1%}' if eff is not None else '-'):>9} {hours:>10,.0f}"
        )
    return lines


def fastest_plan(plan: Plan, link: Link, overrides: list[str], resumed) -> tuple[Plan, list[str]]:
    """The plan re-made with the fastest candidate's settings (``overrides`` and ``resumed``: as
    make_plan took them for ``plan``), and the ranking's lines to print before it; the memory plan
    as it is when nothing ranks."""
    from dist_lm.plan.planner import make_plan

    fixed = {o.split("=", 1)[0] for o in plan.user_overrides}
    ranked = rank_layouts(plan, link, fixed)
    cfg = plan.config
    tokens = cfg.train.max_tokens or cfg.train.max_steps * (cfg.train.global_batch_size or 1) * cfg.model.seq_len
    lines = [f"scaling model, over {link.name} ({link.source}): the fastest of {len(ranked)} layouts that fit"]
    if not ranked:
        return plan, lines[:0]
    lines += ranking_table(ranked, tokens)
    best = ranked[0]
    exact = next((c for c in ranked if not c.parallel.get("zero_quantized_weights")), None)
    if exact is not None and exact.step.seconds <= best.step.seconds * (1 + QUANTIZED_MIN_GAIN):
        best = exact
    mine = [o for o in best.overrides if o.split("=", 1)[0] not in fixed]
    chosen = make_plan(plan.machine, overrides, resumed=resumed, decided=mine)
    eff = best.scaling_efficiency
    chosen.reasons.append(
        f"chosen by the scaling model over {link.name} (quantized collectives only where they gain "
        f"{QUANTIZED_MIN_GAIN:.0%}): {best.describe()}, "
        f"{best.step.tokens_per_s_per_gpu:,.0f} tokens/s per GPU predicted"
        + (f", {eff:.0%} of one node's" if eff is not None else "")
        + f", {tokens / best.step.tokens_per_s_per_gpu / 3600:,.0f} GPU-hours for the run's {tokens:,} tokens "
        "(docs/planner.md, The scaling model)"
    )
    return chosen, lines
