"""A rank's share of each window under sequence parallelism (parallel.sequence_parallel_size).

The model, told its share (TrainingOptions.sequence_shard), embeds and runs its blocks on those
tokens only; attention sees the whole window through whatever plugs into its seam
(Attention.attend: dist_lm.runtime.parallel's all-to-all), and the loss is this share's part of
the window's mean. The model knows nothing of the ranks or of how attention gathers the window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceShard:
    """Tokens [index x L, (index + 1) x L) of each window of count x L tokens."""

    index: int
    count: int

    def bounds(self, length: int) -> tuple[int, int]:
        share = length // self.count
        return self.index * share, (self.index + 1) * share

    def of(self, tokens: torch.Tensor) -> torch.Tensor:
        """This share of (batch, seq, ...) ``tokens``."""
        start, stop = self.bounds(tokens.shape[1])
        return tokens[:, start:stop]
