"""The model on its own: shapes, parameter formula, initial loss, GQA, activation checkpointing."""

from __future__ import annotations

import math

import pytest
import torch

from dist_lm.config.schema import ModelConfig
from dist_lm.model.transformer import Transformer, count_parameters, flops_per_token


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=512, seq_len=32, d_model=64, n_layers=2, n_heads=4)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2}, {"n_kv_heads": 1}, {"activation": "geglu"},
                                {"activation": "gelu"}, {"tie_embeddings": True}])
def test_parameter_formula_matches_module(kw):
    cfg = tiny(**kw)
    model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)["total"]
    logits = model(torch.randint(0, 512, (2, 32)))
    assert logits.shape == (2, 32, 512)


def test_no_biases_and_tied_embeddings_share_storage():
    model = Transformer(tiny(tie_embeddings=True))
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    assert model.lm_head.weight is model.tok_embeddings.weight


def test_fresh_model_loss_is_near_ln_vocab():
    torch.manual_seed(0)
    cfg = tiny(vocab_size=4096)
    model = Transformer(cfg)
    x, y = torch.randint(0, 4096, (4, 32)), torch.randint(0, 4096, (4, 32))
    assert abs(model(x, y).item() - math.log(4096)) < 0.1


def test_causality_future_tokens_do_not_change_the_past():
    torch.manual_seed(0)
    model = Transformer(tiny(n_kv_heads=2)).eval()
    x = torch.randint(0, 512, (1, 32))
    y = x.clone()
    y[0, 20:] = (y[0, 20:] + 1) % 512
    torch.testing.assert_close(model(x)[0, :20], model(y)[0, :20])


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = Transformer(tiny(n_kv_heads=2))
    x, y = torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))
    model(x, y).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing = True
    model(x, y).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=0, atol=0, msg=n)


def test_flops_per_token_follows_the_6n_plus_attention_formula():
    cfg = tiny()
    expected = 6 * count_parameters(cfg)["matmul"] + 12 * 2 * 64 * 32
    assert flops_per_token(cfg) == expected
    # The matmul parameters leave out only the embedding lookup.
    assert count_parameters(cfg)["total"] - count_parameters(cfg)["matmul"] == 512 * 64


def test_longer_sequence_than_configured_is_refused():
    with pytest.raises(ValueError, match="longer than model.seq_len"):
        Transformer(tiny())(torch.zeros(1, 33, dtype=torch.long))
