"""The engine's reference: the same model on the same samples in one process of plain PyTorch
(dist_lm.train.plain, which the bench's baseline also runs). No DeepSpeed there, on purpose."""

from __future__ import annotations

import torch

from dist_lm.config.io import load_config
from dist_lm.train.plain import PlainTraining


def reference_losses(preset: str, overrides: list[str], steps: int) -> list[float]:
    """Each step's loss, the mean over its micro-batches as the training log has it."""
    plain = PlainTraining(load_config(preset, overrides), torch.device("cpu"))
    losses = []
    for _ in range(steps):
        micro_losses = plain.step()
        losses.append(sum(loss.item() for loss in micro_losses) / len(micro_losses))
    plain.close()
    return losses
