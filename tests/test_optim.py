"""Learning-rate schedules and weight-decay groups."""

from __future__ import annotations

import pytest

from dist_lm.config.schema import ModelConfig, OptimConfig
from dist_lm.model.transformer import Transformer
from dist_lm.runtime.optim import lr_at, param_groups


def test_warmup_then_cosine_to_min_lr():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, cfg, 100) == pytest.approx(0.1)
    assert lr_at(9, cfg, 100) == pytest.approx(1.0)
    assert lr_at(55, cfg, 100) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)
    assert lr_at(500, cfg, 100) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_cosine_restarts_returns_to_peak():
    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, schedule="cosine_restarts", restart_period=20)
    assert lr_at(0, cfg, 100) == pytest.approx(1.0)
    assert lr_at(10, cfg, 100) == pytest.approx(0.5)
    assert lr_at(20, cfg, 100) == pytest.approx(1.0)


def test_warmup_stable_decay():
    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=5, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, cfg, 100) == 1.0 and lr_at(80, cfg, 100) == 1.0
    assert lr_at(90, cfg, 100) == pytest.approx(0.5)
    assert lr_at(100, cfg, 100) == pytest.approx(0.0)


def test_constant():
    cfg = OptimConfig(lr=0.3, min_lr=0.0, warmup_steps=0, schedule="constant")
    assert lr_at(0, cfg, 10) == lr_at(9999, cfg, 10) == 0.3


def test_weight_decay_on_matrices_only():
    model = Transformer(ModelConfig(vocab_size=128, seq_len=8, d_model=32, n_layers=1, n_heads=2, tie_embeddings=True))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
