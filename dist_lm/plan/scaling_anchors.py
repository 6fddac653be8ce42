"""Published measurements the scaling model (dist_lm.plan.scaling) is checked against, and its
prediction of each. docs/planner.md prints the same table (tests/test_scaling.py keeps the two
equal), with the error each row may have.

Each anchor is a measured throughput on one layout (the reference) and another measured on a
larger one (the target). The reference gives the compute term: the MFU at which the model
predicts it (an engine's own efficiency, which differs between torchtitan and DeepSpeed). What is
checked is the rest: how throughput per GPU changes with the GPUs, the link and the ZeRO stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_lm.config.io import load_config
from dist_lm.config.layout import parallel_layout
from dist_lm.plan.scaling import LINKS, Cluster, calibrated_mfu, step_time
from dist_lm.runtime.precision import Precision

LLAMA_31_8B = [
    "model.vocab_size=128256",
    "model.d_model=4096",
    "model.n_layers=32",
    "model.n_heads=32",
    "model.n_kv_heads=8",
    "model.ffn_hidden=14336",
    "model.seq_len=8192",
    "parallel.precision=bf16",
    "parallel.zero_stage=3",  # FSDP: weights gathered for each pass, gradients reduce-scattered
    "parallel.activation_checkpointing=false",  # selective: a small share recomputed
    "train.micro_batch_size=2",
    "checkpoint.interval=0",
]
# Our 1.13B (the h100-80gb preset with the embedded corpus's 4,096-token vocabulary), seq 2048,
# micro 8, four micro-batches a rank a step, compiled.
OURS_1B = ["model.vocab_size=4096", "train.micro_batch_size=8", "checkpoint.interval=0"]
TORCHTITAN = (
    "torchtitan benchmarks/llama3_h100_202412_torchtitan.md, tables 1 and 3 (H100, 8 per node, 400 Gb/s per GPU)"
)
OURS = "docs/benchmarks.md, Scaling (two H200s of one host, 2026-11-24)"


@dataclass(frozen=True)
class Anchor:
    name: str
    source: str
    overrides: list[str]
    gpu_name: str
    link: str
    reference: tuple[int, int, list[str], float]
    """(nodes, GPUs per node, overrides of that run, measured tokens/s per GPU)."""
    target: tuple[int, int, list[str], float]
    grad_bytes: float | None
    """Bytes per gradient on the wire, where the engine differs from the weights' dtype."""
    error_bound: float
    """The largest relative error docs/planner.md states for this anchor."""

    def predict(self) -> tuple[float, float]:
        """(predicted, published) tokens/s per GPU on the target layout."""
        (ref_nodes, ref_gpus, ref_args, ref_tps), (nodes, gpus, args, published) = self.reference, self.target
        precision = Precision.BF16
        ref_cfg = load_config(None, [*self.overrides, *ref_args])
        ref_cluster = Cluster(ref_nodes, ref_gpus, self.gpu_name, LINKS[self.link])
        ref_layout = parallel_layout(ref_cfg.parallel, ref_cfg.model, ref_cluster.world_size)
        mfu = calibrated_mfu(ref_cfg, ref_layout, ref_cluster, precision, ref_tps, self.grad_bytes)
        cfg = load_config(None, [*self.overrides, *args])
        cluster = Cluster(nodes, gpus, self.gpu_name, LINKS[self.link])
        layout = parallel_layout(cfg.parallel, cfg.model, cluster.world_size)
        return step_time(cfg, layout, cluster, precision, mfu, self.grad_bytes).tokens_per_s_per_gpu, published


ANCHORS = (
    Anchor(
        "torchtitan, Llama 3.1 8B, FSDP, eager: 8 -> 128 H100",
        TORCHTITAN,
        LLAMA_31_8B,
        "H100",
        "ib-400",
        (1, 8, ["train.global_batch_size=16"], 5762.0),
        (16, 8, ["train.global_batch_size=256"], 5605.0),
        4.0,  # torchtitan reduces gradients in fp32 (its mixed_precision_reduce default)
        0.04,
    ),
    Anchor(
        "torchtitan, Llama 3.1 8B, FSDP, compiled: 8 -> 128 H100",
        TORCHTITAN,
        LLAMA_31_8B,
        "H100",
        "ib-400",
        (1, 8, ["train.global_batch_size=16"], 6667.0),
        (16, 8, ["train.global_batch_size=256"], 6514.0),
        4.0,
        0.04,
    ),
    Anchor(
        "dist-lm 1.13B, ZeRO-1 on 1 -> ZeRO-2 on 2 H200 (NVLink)",
        OURS,
        OURS_1B,
        "H200",
        "nvlink",
        (1, 1, ["parallel.zero_stage=1", "train.global_batch_size=32"], 69570.0),
        (1, 2, ["parallel.zero_stage=2", "train.global_batch_size=64"], 131227.0 / 2),
        None,
        0.07,
    ),
    Anchor(
        "dist-lm 1.13B, ZeRO-1 on 1 -> ZeRO-3 DeepCompile on 2 H200 (NVLink)",
        OURS,
        OURS_1B,
        "H200",
        "nvlink",
        (1, 1, ["parallel.zero_stage=1", "train.global_batch_size=32"], 69570.0),
        (1, 2, ["parallel.zero_stage=3", "train.global_batch_size=64"], (121547.0 + 122477.0) / 2 / 2),
        None,
        0.15,
    ),
)


def anchor_table() -> list[str]:
    """The markdown table of docs/planner.md: each anchor's published and predicted figure."""
    rows = [
        "| anchor | published tokens/s per GPU | predicted | error | stated bound |",
        "|---|---|---|---|---|",
    ]
    for anchor in ANCHORS:
        predicted, published = anchor.predict()
        rows.append(
            f"| {anchor.name} | {published:,.0f} | {predicted:,.0f} | {predicted / published - 1:+.1%} | "
            f"±{anchor.error_bound:.0%} |"
        )
    return rows
