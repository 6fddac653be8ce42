"""The optimizer: parameter groups, the torch optimizer handed to DeepSpeed, and the
learning-rate schedule (a pure function of the step)."""

from __future__ import annotations

import math

import torch
from torch import nn

from dist_lm.config.schema import OptimConfig, ParallelConfig


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


def client_optimizer(
    param_sets: list[dict], optim: OptimConfig, parallel: ParallelConfig
) -> torch.optim.Optimizer | None:
    """The optimizer DeepSpeed wraps, or None where DeepSpeed builds its own from the "optimizer"
    section of its config (dist_lm.runtime.ds_config): its CPU Adam for optimizer offload (several
    times faster on the host than a torch optimizer), its Muon."""
    if parallel.offload_optimizer or optim.name == "muon":
        return None
    # torch's fused kernel, on GPU and CPU alike (DeepSpeed's own FusedAdam is a JIT build that
    # fails on some images); it can also skip a non-finite update on the device
    # (dist_lm.runtime.engine.step).
    return fused_adamw(param_sets, optim)


def fused_adamw(param_sets: list[dict], optim: OptimConfig) -> torch.optim.AdamW:
    """torch's fused AdamW with the run's betas and eps; the weight decay is the groups'
    (param_groups) and the learning rate is set before every step (lr_at)."""
    return torch.optim.AdamW(param_sets, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=True)


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
