"""Predicted peak GPU memory of one rank: model states under each ZeRO stage and offload
choice, plus activations per micro-batch with and without activation checkpointing, eager or
compiled.

A model of our model family under DeepSpeed, in bytes, compared with
``torch.cuda.max_memory_allocated`` (what the training log's ``mem`` reports; the CUDA
context and allocator slack come on top, which is why the planner keeps headroom).
The activation counts are the model's own (each layer counts what autograd keeps for it, eager,
or what torch.compile keeps: dist_lm.model.layers); the DeepSpeed buffer terms follow what its
ZeRO optimizers allocate. parallel.precision=fp8 is counted as bf16: torchao's float8 layers
keep bf16 weights with fp32 masters as bf16 does, and their float8 casts are transient.
``tools/bench_memory.py`` measures the same configurations on a GPU; docs/benchmarks.md records how
close the two came.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from dist_lm.config.layout import ParallelLayout
from dist_lm.config.schema import ModelConfig, ParallelConfig
from dist_lm.model.counts import count_parameters, saved_bytes_per_token
from dist_lm.model.layers import MLP, Attention, RMSNorm
from dist_lm.model.loss import uses_chunked
from dist_lm.runtime.precision import Precision

GB = 1e9
WORKSPACES = 0.07 * GB  # what a tiny model's measured peak leaves over its states (docs/benchmarks.md)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank at the peak of a training step."""

    weights: float
    grads: float
    optimizer: float
    """Optimizer state on the GPU: fp32 master weights (mixed precision) and Adam's two moments."""
    buffers: float
    """DeepSpeed's communication buckets and flat gradient buffers."""
    activations: float
    """What the blocks keep for backward, for one micro-batch."""
    logits: float
    """The output head's logits and the fp32 cross-entropy around them, for one micro-batch."""
    other: float
    """The CUDA libraries' workspaces (cuBLAS and the like)."""

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    def describe(self) -> str:
        parts = ", ".join(f"{f.name} {getattr(self, f.name) / GB:.1f}" for f in fields(self))
        return f"{self.total / GB:.1f} GB ({parts})"


def estimate(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: Precision | str,
    micro_batch: int,
    layout: ParallelLayout | int,
    z_loss: bool = False,
) -> MemoryEstimate:
    """Peak bytes on one GPU for a resolved precision (a Precision, or its name). ``layout``: the
    ranks' layout, or a number of data-parallel ranks. ``z_loss``: optim.z_loss is on (eager, its
    logsumexp keeps the fp32 logits; compiled, assumed fused with the cross-entropy, not measured).

    Under sequence parallelism ZeRO partitions over every rank (data x sequence), the blocks and
    the logits hold the rank's share of each window, and each layer's all-to-all keeps its
    send and receive copies of q, k, v and the output while it runs (one layer at a time).
    Under tensor parallelism a rank holds its share of the blocks' linear layers (the
    embeddings, the head and the norms whole), ZeRO partitions that over the data-parallel
    ranks, and attention and the MLP keep their shares of the heads and the width for backward."""
    precision = Precision(precision)
    if model.vocab_size is None:
        raise ValueError("model.vocab_size must be resolved before estimating memory")
    if isinstance(layout, int):
        layout = ParallelLayout(layout, 0)
    tp = layout.tensor_parallel_size
    params = parameters_per_rank(model, tp)
    w_bytes = precision.bytes_per_weight
    stage, n = parallel.zero_stage, layout.zero_shards

    weights = w_bytes * params / (n if stage == 3 else 1)
    if stage == 3 and parallel.zero_hpz_partition_size > 1:  # ZeRO++ hpZ's secondary partition, within a node
        weights += w_bytes * params / parallel.zero_hpz_partition_size
    if parallel.offload_params:
        weights = w_bytes * params / max(model.n_layers, 1)  # roughly one block resident at a time
    if precision.autocast:
        weights += 2 * params  # autocast's bf16 copy of each weight, kept for backward
    # Gradients. Stages 0-1 keep every gradient in the model's dtype, except under bf16 at stage 1:
    # there DeepSpeed's BF16_Optimizer accumulates into a whole fp32 buffer (dist_lm.runtime.ds_config sets
    # grad_accum_dtype=fp32) and, with immediate_grad_update, frees each bf16 gradient as soon as
    # it is added there. Stage 2 reduces gradients through its buckets into a partition in the
    # accumulation dtype; stage 3 keeps a partition in the model's dtype and one in fp32.
    accum_bytes = 4 if precision.accumulates_in_fp32 else w_bytes
    if stage <= 1:
        grads = w_bytes * params
        if precision.accumulates_in_fp32 and stage == 1:
            grads = 4 * params + (grads if parallel.offload_optimizer else 0)  # offload: ZeRO's optimizer
    elif stage == 2:
        grads = accum_bytes * params / n
    else:
        grads = (w_bytes + (4 if precision.accumulates_in_fp32 else 0)) * params / n
    # Adam's two fp32 moments, and an fp32 master copy with mixed precision (or with ZeRO,
    # which keeps its own fp32 partition even in fp32), partitioned from stage 1.
    optimizer = (8 + (4 if precision.mixed or stage >= 1 else 0)) * params / (n if stage >= 1 else 1)
    if parallel.offload_optimizer:
        optimizer = 0.0
    # Reduction buckets of reduce_bucket_size elements in the model's dtype, two with overlap,
    # allocated whole whatever the model's size (stage 1 under bf16 uses none).
    buffers = 0.0
    if stage == 2 or (stage == 1 and not precision.accumulates_in_fp32):
        buffers = parallel.reduce_bucket_size * w_bytes * (2 if parallel.overlap_comm else 1)
    elif stage == 3:
        buffers = parallel.reduce_bucket_size * w_bytes

    tokens = micro_batch * model.seq_len // layout.sequence_parallel_size  # this rank's share
    act_bytes = precision.bytes_per_activation
    if layout.sequence_parallel_size > 1:
        q_width, kv_width = model.n_heads * model.head_size, model.kv_heads * model.head_size
        buffers += 2 * tokens * act_bytes * (2 * q_width + 2 * kv_width)  # q, o, k, v: in and out
    # With checkpointing, the compiled count fell short of the checkpointed presets measured
    # compiled (whose peak is then not at the start of backward), while the eager count held
    # them (docs/benchmarks.md): so checkpointed runs are counted eager.
    compiled = parallel.compile and not parallel.activation_checkpointing
    per_block, block_input = saved_bytes_per_token(model, act_bytes, compiled)
    if parallel.tiled_mlp:  # the MLP keeps nothing but its input (the norm's output, counted there) ...
        per_block -= MLP.saved_bytes_per_token(model, act_bytes, compiled)
    if tp > 1:  # attention and the MLP keep their shares of the heads and the width; the norms whole
        split = Attention.saved_bytes_per_token(model, act_bytes, compiled)
        if not parallel.tiled_mlp:
            split += MLP.saved_bytes_per_token(model, act_bytes, compiled)
        per_block -= split * (1 - 1 / tp)
    # Every block's input when checkpointing, plus one block's activations while it is
    # recomputed; else every block's activations, plus (eager) one block's worth of temporaries
    # in backward, the gradients flowing through it. Compiled, the kept tensors alone matched.
    if parallel.activation_checkpointing:
        blocks = model.n_layers * block_input + per_block
    else:
        blocks = (model.n_layers + (0 if compiled else 1)) * per_block
    activations = tokens * blocks
    if parallel.tiled_mlp:  # ... and one tile of about d_model tokens per sequence at a time, in backward
        activations += micro_batch * model.d_model * MLP.saved_bytes_per_token(model, act_bytes, compiled) / tp
    if precision.autocast:
        # Under autocast the residual stream stays fp32 (the embedding and the norms are not
        # autocast's): 2 bytes more for each copy of it a block keeps, its input when
        # checkpointing, else its two norms' inputs. 13 GB at 1.1B with micro-batch 32 on an
        # H200 (docs/benchmarks.md).
        activations += tokens * model.n_layers * model.d_model * 2 * (1 if parallel.activation_checkpointing else 2)
    # The embedding output and the final norm's input, kept in fp32 too when eager.
    activations += tokens * (2 * act_bytes if compiled else 4 + 2 * act_bytes) * model.d_model
    # At the start of backward, eager: log-softmax's saved fp32 output, the fp32 gradient flowing
    # out of it, and its cast to the compute dtype. Compiled, the cross-entropy is fused and only
    # the logits in the compute dtype are kept.
    logits = tokens * model.vocab_size * (act_bytes if compiled else 4 + 4 + act_bytes)
    if z_loss and not compiled:
        logits += tokens * model.vocab_size * 4  # logsumexp keeps the fp32 logits themselves
    if uses_chunked(model, on_gpu=True, compiled=parallel.compile):
        # Chunked (dist_lm.model.loss): the logits in the compute dtype, kept for backward, and
        # their gradient in the same dtype; no fp32 copy, compiled or not.
        logits = tokens * model.vocab_size * 2 * act_bytes
    return MemoryEstimate(weights, grads, optimizer, buffers, activations, logits, WORKSPACES)


def parameters_per_rank(model: ModelConfig, tp: int) -> float:
    """The parameters one tensor-parallel rank holds: its share of the blocks' linear layers, and
    the rest (embeddings, head, norms) whole."""
    return count_parameters(model)["total"] - model.n_layers * _linear_parameters(model) * (1 - 1 / tp)


def _linear_parameters(model: ModelConfig) -> int:
    """A block's parameters that tensor parallelism splits: attention's four projections and the MLP."""
    norms = 2 * RMSNorm.parameter_count(model.head_size) if model.qk_norm else 0
    return Attention.parameter_count(model) - norms + MLP.parameter_count(model)
