"""Parameter groups and learning-rate schedules (pure functions of the step)."""

from __future__ import annotations

import math

from torch import nn

from dist_lm.config.schema import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the matrices (linear weights, embeddings); leave norms and biases undecayed."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied matrix once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [  # named: DeepSpeed's MoE regrouping keys the expert groups by name
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of a run of ``max_steps`` steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
        return _cosine(progress, cfg)
    if cfg.schedule == "cosine_restarts":
        progress = ((step - cfg.warmup_steps) % cfg.restart_period) / cfg.restart_period
        return _cosine(progress, cfg)
    if cfg.schedule == "wsd":
        decay_start = max_steps - int(cfg.decay_fraction * max_steps)
        if step < decay_start:
            return cfg.lr
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def _cosine(progress: float, cfg: OptimConfig) -> float:
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
