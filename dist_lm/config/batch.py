"""The batch arithmetic: micro-batch x gradient accumulation x data-parallel ranks. The only
place that multiplies them; DeepSpeed's config, the sampler, the planner and the benchmarks ask it.
The data-parallel ranks are the layout's (dist_lm.config.layout), not the world size."""

from __future__ import annotations

from dataclasses import dataclass

from dist_lm.config.schema import ConfigError, TrainConfig


@dataclass(frozen=True)
class BatchSizes:
    micro_batch_size: int
    """Sequences per rank per forward/backward."""
    grad_accum_steps: int
    """Micro-batches per rank per optimizer step."""
    dp_size: int
    """Data-parallel ranks."""

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.dp_size

    @property
    def per_rank_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps


def batch_sizes(train: TrainConfig, dp_size: int) -> BatchSizes:
    """Split train.global_batch_size into micro-batch x accumulation x data-parallel ranks, or say
    why it can't."""
    micro = train.micro_batch_size
    if train.global_batch_size is None:
        return BatchSizes(micro, 1, dp_size)
    per_step = micro * dp_size
    if train.global_batch_size % per_step:
        lower = max(per_step, train.global_batch_size // per_step * per_step)
        raise ConfigError(
            "train.global_batch_size",
            f"{train.global_batch_size} is not a multiple of micro_batch_size x data-parallel ranks = "
            f"{micro} x {dp_size} = {per_step}; use {lower} or {lower + per_step}, or change train.micro_batch_size",
        )
    return BatchSizes(micro, train.global_batch_size // per_step, dp_size)


def global_batch_size(train: TrainConfig, dp_size: int) -> int:
    """Sequences per optimizer step: train.global_batch_size, or one micro-batch per rank."""
    return train.global_batch_size or train.micro_batch_size * dp_size


def rounded_up(global_batch: int, micro: int, dp_size: int) -> int:
    """The smallest global batch at or above ``global_batch`` that micro-batches of ``micro`` on
    ``dp_size`` ranks make up (for the planner, which may not refuse the user's global batch)."""
    per_step = micro * dp_size
    return -(-global_batch // per_step) * per_step
