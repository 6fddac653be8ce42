"""The scaling model: what one optimizer step of a layout costs on a cluster, before the job is
paid for. `dist-lm plan --nodes N --gpus-per-node G --link L` ranks the layouts that fit by it
(dist_lm.plan.ranking); docs/planner.md sets its predictions beside published measurements.

A step is three terms:
- **compute**: the model's training FLOPs for the tokens each GPU works on (activation
  checkpointing adds a forward), at a measured MFU for the GPU kind;
- **exposed communication**: the bytes each collective moves per step over the link it crosses,
  at that link's bus bandwidth, less what hides behind compute. ZeRO's reductions and gathers
  overlap the pass they serve (DeepSpeed's overlap_comm and ZeRO-3 prefetch), all but the first
  layer's gather and the last layer's reduction; ZeRO-1/2's gather of the updated weights after
  the optimizer step, sequence parallelism's all-to-alls and tensor parallelism's all-reduces sit
  on the critical path;
- **checkpoint**: the busiest rank's bytes (DeepSpeed's files and our weights files) at a measured
  rate, spread over the interval: the copy to host memory with checkpoint.async_save (on for GPU
  runs by default), the whole write without it.

What it leaves out (docs/planner.md, "The scaling model"): collective latency at small messages,
stragglers, DeepSpeed's host work per ZeRO stage, a shared filesystem's limit on checkpoint writes,
and MFU's growth with the model's width.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_lm.config.batch import batch_sizes
from dist_lm.config.layout import ParallelLayout
from dist_lm.config.schema import Config
from dist_lm.model.counts import count_parameters, flops_per_token
from dist_lm.plan.memory import parameters_per_rank
from dist_lm.plan.sizing import MFU_ASSUMED
from dist_lm.runtime.hardware import peak_flops_for
from dist_lm.runtime.precision import Precision

GB = 1e9


@dataclass(frozen=True)
class Link:
    """A link between the GPUs of different nodes (or, for "nvlink", within one)."""

    name: str
    gbit_s: float
    """Line rate in Gbit/s, one direction."""
    per_gpu: bool
    """Each GPU has one (InfiniBand rails, NVLink); otherwise the node's GPUs share it."""
    source: str


# The bandwidth and efficiency constants, with where each comes from. All of them are inputs the
# model takes as given; none was fitted to the published measurements it is checked against.
LINKS = {
    "nvlink": Link(
        "nvlink", 3600.0, True, "NVLink 4 of an H100/H200 SXM: 900 GB/s both ways per GPU (NVIDIA's H100 data sheet)"
    ),
    "ib-400": Link(
        "ib-400", 400.0, True, "NDR InfiniBand, one 400 Gb/s adapter per GPU (DGX H100; torchtitan's Grand Teton hosts)"
    ),
    "ib-200": Link("ib-200", 200.0, True, "HDR InfiniBand, one 200 Gb/s adapter per GPU (DGX A100)"),
    "eth-100": Link("eth-100", 100.0, False, "one 100 Gb/s Ethernet port per node, shared by its GPUs"),
}
INTRA_NODE = LINKS["nvlink"]
BUS_EFFICIENCY = 0.8
"""The share of a link's line rate NCCL's ring collectives reach at large messages (bus bandwidth,
as nccl-tests reports it). An assumption of this model, not measured here."""

# MFU of our engine on one GPU, bf16 at ZeRO-1, compiled, 1.13B (docs/benchmarks.md): first match
# of the GPU's name wins; others get the planner's MFU_ASSUMED.
MEASURED_MFU: tuple[tuple[str, float, str], ...] = (
    ("H200", 0.559, "one H200, 2026-11-24: 69,570 tokens/s (benchmarks.md, Scaling)"),
    ("H100", 0.537, "one H100, 2026-11-23: 66,938 tokens/s (benchmarks.md, Speed against plain PyTorch)"),
)
CHECKPOINT_GB_PER_S = 20.3 / 34.5
"""One rank's save rate, checksums included: 20.3 GB in 34.5 s at 1.13B on one H100 (2026-12-06,
benchmarks.md, Data and checkpoint throughput)."""
STAGING_GB_PER_S = 20.35 / 0.41
"""One rank's copy of a save to host memory, all that checkpoint.async_save holds training for:
20.35 GB in 0.41 s at 1.13B on one H100, a save into the pinned buffers of the run's first (which
took 5.17 s, once a process; 2026-12-07, benchmarks.md, Save stall). The write that follows on a
thread did not slow the steps beside it there, so it is charged nothing. Assumes the node's memory
holds the copies of all its ranks (`dist-lm plan` says when it does not)."""
# Bytes on the wire per weight for ZeRO++'s quantized collectives: qwZ gathers int8 weights,
# qgZ reduces int4 gradients (DeepSpeed's ZeRO++ paper, arXiv:2306.10209; block scales left out).
QWZ_BYTES, QGZ_BYTES = 1.0, 0.5


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_name: str
    link: Link

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def bus_bytes_per_s(self, size: int, stride: int) -> float:
        """Bus bandwidth of a ring over ``size`` ranks ``stride`` apart (ranks fill nodes in
        order). Within a node it is NVLink's; across nodes each node's members send through their
        own adapters (or share the node's one), and never faster than NVLink feeds them."""
        nvlink = INTRA_NODE.gbit_s / 8 * GB
        if size * stride <= self.gpus_per_node or self.nodes == 1:
            return nvlink * BUS_EFFICIENCY
        members_per_node = max(1, min(size, self.gpus_per_node // stride))
        adapters = members_per_node if self.link.per_gpu else 1
        return min(nvlink, self.link.gbit_s / 8 * GB * adapters) * BUS_EFFICIENCY


def measured_mfu(gpu_name: str) -> tuple[float, str]:
    for key, mfu, source in MEASURED_MFU:
        if key in gpu_name:
            return mfu, source
    return MFU_ASSUMED, "assumed (no measurement on this GPU kind)"


@dataclass(frozen=True)
class StepTime:
    """One optimizer step, in seconds, and what each GPU gets from it."""

    compute: float
    exposed: dict[str, float]
    """Communication left on the critical path, by collective."""
    hidden: float
    """Communication that ran behind compute."""
    checkpoint: float
    """A save's time spread over checkpoint.interval steps (0 with no interval)."""
    tokens: int
    """Tokens of the global batch."""
    gpus: int

    @property
    def seconds(self) -> float:
        return self.compute + sum(self.exposed.values()) + self.checkpoint

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens / self.seconds / self.gpus


@dataclass(frozen=True)
class _Collective:
    name: str
    bytes: float
    """Bus bytes per occurrence."""
    bandwidth: float
    per_micro_batch: bool
    window: str
    """"forward", "backward" (the pass it overlaps) or "none" (on the critical path)."""


def step_time(
    cfg: Config,
    layout: ParallelLayout,
    cluster: Cluster,
    precision: Precision,
    mfu: float | None = None,
    grad_bytes: float | None = None,
) -> StepTime:
    """The predicted step of ``cfg`` on ``layout`` over ``cluster``. ``mfu``: the compute's MFU
    (default: MEASURED_MFU for the GPU); ``grad_bytes``: bytes per gradient on the wire (default:
    the weights' dtype, as DeepSpeed reduces)."""
    model, parallel = cfg.model, cfg.parallel
    batch = batch_sizes(cfg.train, layout.dp_size)
    sp, tp, accum = layout.sequence_parallel_size, layout.tensor_parallel_size, batch.grad_accum_steps
    tokens_per_micro = batch.micro_batch_size * model.seq_len  # one data-parallel rank's micro-batch
    peak = peak_flops_for(cluster.gpu_name)
    if peak is None:
        raise ValueError(f"the peak FLOP/s of {cluster.gpu_name!r} is unknown (dist_lm.runtime.hardware)")
    recompute = 4 / 3 if parallel.activation_checkpointing else 1.0
    flops = flops_per_token(model) * tokens_per_micro * accum / (sp * tp) * recompute
    compute = flops / (peak * (mfu if mfu is not None else measured_mfu(cluster.gpu_name)[0]))

    collectives = _collectives(cfg, layout, cluster, precision, grad_bytes, tokens_per_micro)
    per_pass = {"forward": compute / 3 / accum, "backward": 2 * compute / 3 / accum}
    exposed: dict[str, float] = {}
    hidden = 0.0
    for window in ("forward", "backward"):
        # Each micro-batch's pass hides its collectives, all but the first layer's gather and the
        # last layer's reduction; the post-step collectives of ZeRO 0-1 hide in the last backward.
        per_micro = [c for c in collectives if c.window == window and c.per_micro_batch]
        once = [c for c in collectives if c.window == window and not c.per_micro_batch]
        for group, times in ((per_micro, accum), (once, 1)):
            seconds = sum(c.bytes / c.bandwidth for c in group)
            if not seconds:
                continue
            edge = seconds / model.n_layers
            shown = max(seconds - per_pass[window], 0.0) + edge
            for c in group:
                share = c.bytes / c.bandwidth / seconds
                exposed[c.name] = exposed.get(c.name, 0.0) + times * shown * share
            hidden += times * (seconds - shown)
    for c in collectives:
        if c.window == "none":
            exposed[c.name] = exposed.get(c.name, 0.0) + c.bytes / c.bandwidth * (accum if c.per_micro_batch else 1)
    interval = cfg.checkpoint.interval
    checkpoint = checkpoint_seconds(cfg, layout, precision) / interval if interval else 0.0
    return StepTime(compute, exposed, hidden, checkpoint, batch.global_batch_size * model.seq_len, layout.world_size)


def _collectives(
    cfg: Config,
    layout: ParallelLayout,
    cluster: Cluster,
    precision: Precision,
    grad_bytes: float | None,
    tokens_per_micro: int,
) -> list[_Collective]:
    model, parallel = cfg.model, cfg.parallel
    sp, tp = layout.sequence_parallel_size, layout.tensor_parallel_size
    weight_bytes = precision.bytes_per_weight
    grad_bytes = weight_bytes if grad_bytes is None else grad_bytes
    params = parameters_per_rank(cfg.model, tp)
    # ZeRO partitions over the data- and sequence-parallel ranks (a tensor-parallel rank's share),
    # whose group strides over the tensor-parallel ranks.
    n = layout.zero_shards
    share = (n - 1) / n
    zero_bw = cluster.bus_bytes_per_s(n, tp)
    out: list[_Collective] = []
    if n > 1:
        stage = parallel.zero_stage
        if stage == 0:
            out.append(_Collective("gradient all-reduce", 2 * share * params * grad_bytes, zero_bw, False, "backward"))
        elif stage in (1, 2):
            out.append(
                _Collective("gradient reduce-scatter", share * params * grad_bytes, zero_bw, stage == 2, "backward")
            )
            out.append(
                _Collective("weights all-gather after the step", share * params * weight_bytes, zero_bw, False, "none")
            )
        else:
            gather = QWZ_BYTES if parallel.zero_quantized_weights else weight_bytes
            reduce = QGZ_BYTES if parallel.zero_quantized_gradients else grad_bytes
            out.append(_Collective("ZeRO-3 forward all-gather", share * params * gather, zero_bw, True, "forward"))
            hpz = parallel.zero_hpz_partition_size
            if hpz > 1:  # the backward gathers from the secondary copy within the node
                backward = _Collective(
                    "ZeRO-3 backward all-gather (hpZ)",
                    (hpz - 1) / hpz * params * gather,
                    cluster.bus_bytes_per_s(hpz, tp),
                    True,
                    "backward",
                )
            else:
                backward = _Collective("ZeRO-3 backward all-gather", share * params * gather, zero_bw, True, "backward")
            out.append(backward)
            out.append(_Collective("gradient reduce-scatter", share * params * reduce, zero_bw, True, "backward"))
    act_bytes = precision.bytes_per_activation
    passes = 3 if parallel.activation_checkpointing else 2  # forward, backward and a recomputed forward
    if sp > 1:  # Ulysses: q, k, v in and the output back, each pass, every layer
        head = model.head_size
        width = 2 * model.n_heads * head + 2 * (model.n_kv_heads or model.n_heads) * head
        bytes_ = (sp - 1) / sp * tokens_per_micro / sp * width * act_bytes * model.n_layers * passes
        out.append(_Collective("sequence all-to-all", bytes_, cluster.bus_bytes_per_s(sp, 1), True, "none"))
    if tp > 1:  # two all-reduces of the residual stream a layer (attention's and the MLP's output) a pass
        bytes_ = 2 * (tp - 1) / tp * tokens_per_micro / sp * model.d_model * act_bytes * 2 * model.n_layers * passes
        out.append(_Collective("tensor all-reduce", bytes_, cluster.bus_bytes_per_s(tp, 1), True, "none"))
    return out


def checkpoint_bytes(cfg: Config, layout: ParallelLayout, precision: Precision) -> tuple[float, float]:
    """One save's bytes, as (what the first data-parallel rank of each tensor-parallel shard saves
    besides, every rank's share); the busiest rank saves both. DeepSpeed's files: the model
    states (a tensor-parallel rank's share; none at ZeRO-3) and the fp32 masters with Adam's two
    moments (whole below ZeRO-1, else each rank's partition). Ours: each rank's 1/world_size of
    the fp32 weights files every save adds for the tools (dist_lm.train.checkpoint.write_weights)."""
    params = parameters_per_rank(cfg.model, layout.tensor_parallel_size)
    n, stage = layout.zero_shards, cfg.parallel.zero_stage
    weights = params * precision.bytes_per_weight
    # fp32 masters and two moments; fp32 weights at ZeRO-0 are their own masters
    optimizer = params * (8 if stage == 0 and precision.bytes_per_weight == 4 else 12)
    shared = 4 * count_parameters(cfg.model)["total"] / layout.world_size
    if stage == 3:  # the model states file holds no weights: the optimizer's partitions are them
        return 0.0, shared + optimizer / n
    if stage >= 1:
        return weights, shared + optimizer / n
    return weights + optimizer, shared


def node_checkpoint_bytes(cfg: Config, layout: ParallelLayout, precision: Precision, ranks_per_node: int) -> float:
    """One save's bytes on the busiest node: the first, which holds the first data-parallel
    rank of each tensor-parallel shard (tensor-parallel groups stay within a node)."""
    first, every = checkpoint_bytes(cfg, layout, precision)
    return min(layout.tensor_parallel_size, ranks_per_node) * first + ranks_per_node * every


def checkpoint_seconds(cfg: Config, layout: ParallelLayout, precision: Precision) -> float:
    """How long one save holds training on the busiest rank, on GPUs: its copy to host memory
    (STAGING_GB_PER_S) with checkpoint.async_save, else its whole write (CHECKPOINT_GB_PER_S)."""
    rate = STAGING_GB_PER_S if cfg.checkpoint.saves_async(on_gpu=True) else CHECKPOINT_GB_PER_S
    return sum(checkpoint_bytes(cfg, layout, precision)) / (rate * GB)


def calibrated_mfu(
    cfg: Config,
    layout: ParallelLayout,
    cluster: Cluster,
    precision: Precision,
    tokens_per_s_per_gpu: float,
    grad_bytes: float | None = None,
) -> float:
    """The MFU at which this model predicts a measured throughput: how a published single-node
    figure of another engine becomes the compute term of its multi-node prediction."""
    low, high = 1e-3, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        predicted = step_time(cfg, layout, cluster, precision, mid, grad_bytes).tokens_per_s_per_gpu
        low, high = (mid, high) if predicted < tokens_per_s_per_gpu else (low, mid)
    return (low + high) / 2
