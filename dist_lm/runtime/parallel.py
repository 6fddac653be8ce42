"""Parallelism past data parallelism, applied to the model from outside (as torchtitan's
parallelize.py applies it to its models): the model stays free of DeepSpeed and of ranks.

Tensor parallelism is DeepSpeed's AutoTP: deepspeed.initialize replaces the blocks' linear
layers named in dist_lm.runtime.ds_config.TENSOR_PARALLEL_LAYERS by its column- and row-parallel
layers, over the (data, tensor) groups of deepspeed.utils.groups that :func:`groups_for` builds
first (its batch arithmetic reads the data-parallel size from them).

Sequence parallelism is DeepSpeed's Ulysses. Its process groups are DeepSpeed's own
(deepspeed.runtime.sequence_parallel.parallel_state_sp, the "mpu" its ALST recipe hands to
deepspeed.initialize), so that its engine reduces gradients and partitions ZeRO's states over
the data x sequence ranks. Each block's attention seam (dist_lm.model.layers.LocalAttention)
is wrapped in DeepSpeed's DistributedAttention, which trades the rank's share of the sequence
for a share of the heads over the whole window, attends, and trades back. The model is told its
share (TrainingOptions.sequence_shard) by dist_lm.runtime.engine.
"""

from __future__ import annotations

import math

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.sequence_parallel import parallel_state_sp
from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP
from deepspeed.sequence.layer import DistributedAttention
from deepspeed.utils import groups
from torch import nn

from dist_lm.config.layout import ParallelLayout
from dist_lm.model.layers import Attention, Positions
from dist_lm.model.sequence import SequenceShard
from dist_lm.model.transformer import Transformer


class UlyssesAttention(nn.Module):
    """What plugs into Attention.attend under sequence parallelism: the local attention behind
    DeepSpeed's all-to-all. (batch, seq/P, heads, head_dim) in and out; the local attention gets
    (batch, seq, heads/P, head_dim), the whole window for a share of the heads."""

    def __init__(self, local: nn.Module, group: dist.ProcessGroup):
        super().__init__()
        # scatter the heads (dim 2), gather the sequence (dim 1); batch first (dim 0).
        self.ulysses = DistributedAttention(local, group, scatter_idx=2, gather_idx=1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: Positions) -> torch.Tensor:
        return self.ulysses(q, k, v, 0, None, pos)


def groups_for(model: Transformer, layout: ParallelLayout) -> object | None:
    """Apply ``layout``'s parallelism to ``model`` as far as it is done before the engine is built,
    and return the groups object that deepspeed.initialize takes as ``mpu`` (None when every
    rank is data-parallel: the model is left as it is). A collective: every rank calls it, in
    the same order."""
    if layout.group_size == 1:
        return None
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the process group we started
    if layout.tensor_parallel_size > 1:
        groups._init_tp_mesh_device(tensor_model_parallel_size=layout.tensor_parallel_size)
        _check_group(groups.get_tensor_model_parallel_group(), layout)
        return groups  # AutoTP itself replaces the layers, inside deepspeed.initialize
    return _sequence_parallel(model, layout)


def _check_group(group: dist.ProcessGroup, layout: ParallelLayout) -> None:
    """The layout's arithmetic is what the sampler and the loss use: DeepSpeed's group must be it."""
    built = dist.get_process_group_ranks(group)
    if built != layout.model_parallel_group():
        raise RuntimeError(f"DeepSpeed's group {built} is not the layout's {layout.model_parallel_group()}")


def _sequence_parallel(model: Transformer, layout: ParallelLayout) -> object:
    """Make ``model`` compute its share of each window and gather the windows in attention."""
    # Its groups are module state, set once per process; a process that trains again after a
    # teardown (a sweep's trials) starts them afresh.
    parallel_state_sp._release_sequence_parallel_groups()
    parallel_state_sp.initialize_sequence_parallel(layout.sequence_parallel_size)
    group = parallel_state_sp.get_sequence_parallel_group()
    _check_group(group, layout)
    for module in model.modules():
        if isinstance(module, Attention):
            module.attend = UlyssesAttention(module.attend, group)
    return _SequenceParallelGroups(layout)


class _SequenceParallelGroups:
    """DeepSpeed's sequence-parallel groups object, as its ALST recipe passes it to
    deepspeed.initialize, but with no model parallelism: Ulysses keeps every parameter whole on
    every rank. parallel_state_sp aliases "model parallel" to the sequence group, and with it
    DeepSpeed 0.19.8 (1) counted only the sequence group's first rank's gradients in the norm, so
    the BF16_Optimizer of bf16 ZeRO-1 failed on the others ("stack expects a non-empty
    TensorList"), and (2) wrote tp_degree = the sequence-parallel size into the model-states file
    beside one such file, which its own universal converter then refused ("model-state file count
    1 does not match pp_degree=1 * tp_degree=2"). Here the model-parallel group is each rank alone:
    the optimizers see a data-parallel run over the data x sequence ranks, which for the
    parameters it is, and a checkpoint of any sequence-parallel layout converts like a
    data-parallel one of the same rank count."""

    def __init__(self, layout: ParallelLayout):
        alone = None
        for rank in range(layout.world_size):  # every rank creates every group (a collective)
            group = dist.new_group([rank])
            if rank == layout.rank:
                alone = group
        self._alone = alone

    def __getattr__(self, name: str):
        return getattr(parallel_state_sp, name)

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self._alone

    # The names DeepSpeed asks first (deepspeed.utils.bwc), and the universal loader asks only.
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_group = get_model_parallel_group


def sequence_shard(layout: ParallelLayout) -> SequenceShard | None:
    """This rank's share of each window, or None without sequence parallelism."""
    if layout.sequence_parallel_size == 1:
        return None
    return SequenceShard(layout.sp_rank, layout.sequence_parallel_size)


def tiled_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """parallel.tiled_mlp: a block's MLP through DeepSpeed's TiledMLP, in tiles of about d_model
    tokens (ALST's choice: a tile's intermediate is then about the size of the block's input),
    each recomputed in backward. Every rank of a window computes the same tile count, so the
    ZeRO-3 gathers inside stay in step."""
    tiles = max(1, math.ceil(x.shape[-2] / x.shape[-1]))
    return TiledMLP.apply(_call, mlp, x, tiles, list(mlp.parameters()))


def _call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)
