"""The parallel layout: which ranks share data, which split a sequence, and where this rank sits.

Built once, from the config and the launch's world size and rank (:func:`parallel_layout`), the
way :mod:`dist_lm.config.batch` is: pure, no process group. Everything that means
"data-parallel" asks it (the batch split, the sampler and the validation windows, the loss
averages, the memory model); "world size" means every rank and nothing else.

Ranks are laid out sequence-fastest: rank = data_rank x sequence_parallel_size + sequence_rank,
so a sequence-parallel group is consecutive ranks, on one node's fast links whenever the group
fits in a node. That is the order DeepSpeed's sequence-parallel groups take
(deepspeed.runtime.sequence_parallel.parallel_state_sp); dist_lm.runtime.parallel checks the
groups it built against :meth:`ParallelLayout.sequence_group`.
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
    expert_parallel_size: int = 1
    """Ranks a moe layer's experts are spread over (parallel.expert_parallel_size), within the
    data-parallel ranks: DeepSpeed's MoE layer builds its own groups."""

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: each reads its own windows."""
        return self.world_size // self.sequence_parallel_size

    @property
    def dp_rank(self) -> int:
        """Which share of the global batch this rank's windows are."""
        return self.rank // self.sequence_parallel_size

    @property
    def sp_rank(self) -> int:
        """Which share of each window's tokens this rank computes."""
        return self.rank % self.sequence_parallel_size

    @property
    def zero_shards(self) -> int:
        """Ranks ZeRO partitions the model states over: all of them. DeepSpeed reduces gradients
        and shards optimizer state over the data x sequence group."""
        return self.dp_size * self.sequence_parallel_size

    def sequence_group(self, dp_rank: int | None = None) -> list[int]:
        """The ranks that split the windows of data-parallel rank ``dp_rank`` (default: this one's)."""
        first = (self.dp_rank if dp_rank is None else dp_rank) * self.sequence_parallel_size
        return list(range(first, first + self.sequence_parallel_size))

    def describe(self) -> str:
        if self.sequence_parallel_size == 1:
            return f"{self.world_size} data-parallel"
        return f"{self.dp_size} data x {self.sequence_parallel_size} sequence parallel"


def parallel_layout(parallel: ParallelConfig, model: ModelConfig, world_size: int, rank: int = 0) -> ParallelLayout:
    """The layout of ``world_size`` ranks for this config, or a ConfigError naming the key at fault."""
    sp = parallel.sequence_parallel_size
    key = "parallel.sequence_parallel_size"
    if world_size % sp:
        fits = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ConfigError(key, f"{sp} does not divide the {world_size} ranks; use one of {fits}")
    if sp > 1:
        for size, what in ((model.n_heads, "model.n_heads"), (model.kv_heads, "the key/value heads")):
            if size % sp:
                raise ConfigError(
                    key,
                    f"{sp} must divide {what} ({size}): attention gives each sequence-parallel rank whole heads",
                )
        if model.seq_len % sp:
            raise ConfigError(key, f"{sp} must divide model.seq_len ({model.seq_len}): each rank takes an equal share")
        if model.position == "bias":
            raise ConfigError(
                key,
                "needs model.position rope, learned or none: the relative bias is per head over the "
                "whole window, which a sequence-parallel rank does not hold",
            )
        if "moe" in model.layer_types:
            raise ConfigError(
                key,
                "does not work with moe layers yet (DeepSpeed's MoE layer and its load-balancing "
                "loss count tokens per rank); use 1, or model.layer_types without moe",
            )
    return ParallelLayout(world_size, rank, sp, parallel.expert_parallel_size)
