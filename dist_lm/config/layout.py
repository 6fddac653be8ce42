"""The parallel layout: which ranks share data, which split a sequence or the layers, and where
this rank sits.

Built once, from the config and the launch's world size and rank (:func:`parallel_layout`), the
way :mod:`dist_lm.config.batch` is: pure, no process group. Everything that means
"data-parallel" asks it (the batch split, the sampler and the validation windows, the loss
averages, the memory model); "world size" means every rank and nothing else.

Ranks are laid out model-parallel-fastest: rank = data_rank x group + rank_in_group, where the
group is the sequence-parallel or the tensor-parallel ranks (one of the two: DeepSpeed's
AutoTP and its Ulysses groups do not combine). So a group is consecutive ranks, on one node's
fast links whenever it fits in a node. That is the order DeepSpeed's own groups take
(deepspeed.runtime.sequence_parallel.parallel_state_sp, and the (data, tensor) device mesh of
deepspeed.utils.groups); dist_lm.runtime.parallel checks the groups it built against
:meth:`ParallelLayout.model_parallel_group`.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_lm.config.errors import ConfigError
from dist_lm.config.model_section import ModelConfig
from dist_lm.config.run_sections import ParallelConfig


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    """Every rank of the job."""
    rank: int
    """This rank, 0 .. world_size - 1."""
    sequence_parallel_size: int = 1
    """Ranks that split each window's tokens (parallel.sequence_parallel_size)."""
    tensor_parallel_size: int = 1
    """Ranks that split each block's linear layers (parallel.tensor_parallel_size)."""
    expert_parallel_size: int = 1
    """Ranks a moe layer's experts are spread over (parallel.expert_parallel_size), within the
    data-parallel ranks: DeepSpeed's MoE layer builds its own groups."""

    @property
    def group_size(self) -> int:
        """Ranks that work on the same windows: the sequence- or tensor-parallel group."""
        return self.sequence_parallel_size * self.tensor_parallel_size

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: each group of them reads its own windows."""
        return self.world_size // self.group_size

    @property
    def dp_rank(self) -> int:
        """Which share of the global batch this rank's windows are."""
        return self.rank // self.group_size

    @property
    def sp_rank(self) -> int:
        """Which share of each window's tokens this rank computes."""
        return self.rank % self.sequence_parallel_size

    @property
    def tp_rank(self) -> int:
        """Which share of each linear layer this rank holds."""
        return self.rank % self.tensor_parallel_size

    @property
    def zero_shards(self) -> int:
        """Ranks ZeRO partitions a model state over. DeepSpeed shards over the data x sequence
        ranks (the weights are whole on each), and under tensor parallelism each rank's own
        shards of the layers over the data-parallel ranks."""
        return self.dp_size * self.sequence_parallel_size

    @property
    def loss_copies(self) -> int:
        """Ranks that each compute a window's whole loss: the tensor-parallel ones all do (the
        sequence-parallel ones each compute a share of it)."""
        return self.tensor_parallel_size

    def model_parallel_group(self, dp_rank: int | None = None) -> list[int]:
        """The ranks that work on the windows of data-parallel rank ``dp_rank`` (default: this one's)."""
        first = (self.dp_rank if dp_rank is None else dp_rank) * self.group_size
        return list(range(first, first + self.group_size))

    def describe(self) -> str:
        if self.sequence_parallel_size > 1:
            return f"{self.dp_size} data x {self.sequence_parallel_size} sequence parallel"
        if self.tensor_parallel_size > 1:
            return f"{self.dp_size} data x {self.tensor_parallel_size} tensor parallel"
        return f"{self.world_size} data-parallel"


def parallel_layout(parallel: ParallelConfig, model: ModelConfig, world_size: int, rank: int = 0) -> ParallelLayout:
    """The layout of ``world_size`` ranks for this config, or a ConfigError naming the key at fault."""
    sp, tp = parallel.sequence_parallel_size, parallel.tensor_parallel_size
    if sp > 1 and tp > 1:
        raise ConfigError(
            "parallel.tensor_parallel_size",
            f"{tp} with parallel.sequence_parallel_size={sp}: DeepSpeed's AutoTP and Ulysses groups do not "
            "combine; choose one of them",
        )
    hpz = parallel.zero_hpz_partition_size
    if world_size % hpz:
        raise ConfigError(
            "parallel.zero_hpz_partition_size",
            f"{hpz} does not divide the {world_size} ranks; use the GPUs per node (or a divisor of the rank count)",
        )
    if hpz > 1 and (sp > 1 or tp > 1):
        raise ConfigError(
            "parallel.zero_hpz_partition_size",
            "is not tested with sequence or tensor parallelism (their groups and hpZ's would interleave); use 1",
        )
    key, size = ("parallel.sequence_parallel_size", sp) if sp > 1 else ("parallel.tensor_parallel_size", tp)
    if world_size % size:
        fits = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ConfigError(key, f"{size} does not divide the {world_size} ranks; use one of {fits}")
    if size > 1:
        _check_divides(key, size, model, sequence=sp > 1)
        _check_supported(key, model, parallel, tensor=tp > 1)
    return ParallelLayout(world_size, rank, sp, tp, parallel.expert_parallel_size)


def _check_divides(key: str, size: int, model: ModelConfig, sequence: bool) -> None:
    what = "sequence" if sequence else "tensor"
    widths = [(model.n_heads, "model.n_heads"), (model.kv_heads, "the key/value heads")]
    widths += [(model.seq_len, "model.seq_len")] if sequence else [(model.ffn_dim, "the MLP's width")]
    for width, name in widths:
        if width % size:
            raise ConfigError(
                key, f"{size} must divide {name} ({width}): each {what}-parallel rank takes an equal, whole share"
            )


def _check_supported(key: str, model: ModelConfig, parallel: ParallelConfig, tensor: bool) -> None:
    if model.position == "bias":
        raise ConfigError(
            key, "needs model.position rope, learned or none: the relative bias is per head over the whole window"
        )
    if "moe" in model.layer_types:
        raise ConfigError(
            key,
            "does not work with moe layers yet (DeepSpeed's MoE layer keeps its own groups); use 1, or "
            "model.layer_types without moe",
        )
    if tensor and parallel.precision == "fp8":
        raise ConfigError(key, "does not work with parallel.precision=fp8 (torchao's float8 layers are not AutoTP's)")
    if tensor and parallel.uses_deepcompile:
        raise ConfigError(key, "does not work with DeepCompile; set parallel.deepcompile=false")
