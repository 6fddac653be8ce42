"""The model on its own: shapes, parameter formula, initial loss, GQA, activation checkpointing."""

from __future__ import annotations

import math

import pytest
import torch

from dist_lm.config.schema import ModelConfig
from dist_lm.model.counts import count_parameters, flops_per_token
from dist_lm.model.loss import TrainingOptions
from dist_lm.model.transformer import Transformer


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=512, seq_len=32, d_model=64, n_layers=2, n_heads=4)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"n_kv_heads": 2},
        {"n_kv_heads": 1},
        {"activation": "geglu"},
        {"activation": "gelu"},
        {"tie_embeddings": True},
        {"head_dim": 32, "n_kv_heads": 2, "qk_norm": True},  # heads wider than d_model / n_heads (Qwen3)
    ],
)
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
    assert abs(model(x, y).total.item() - math.log(4096)) < 0.1


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
    model(x, y).total.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.use(TrainingOptions(activation_checkpointing=True))
    model(x, y).total.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("position", ["rope", "bias"])
def test_compiled_model_compiles_once_and_its_position_tables_stay_fp32(position):
    """The rotary tables (and the relative bias's basis table) exist before the first forward
    and follow the module's device, not its dtype. Made lazily in forward, torch.compile traced
    them in the first call and compiled the whole model again in the second (its guard on the
    empty table cache failed); under CUDA graphs they were a graph output the next replay overwrote."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = Transformer(tiny(position=position)).to(torch.bfloat16)
    tables = model._rope if position == "rope" else [model.relative_bias._table]
    assert all(t.dtype == torch.float32 for t in tables)
    compiled = torch.compile(model, backend="eager")  # dynamo's tracing and guards, no code generation
    x = torch.randint(0, 512, (2, 32))
    try:
        for _ in range(3):
            compiled(x, x).total.backward()
        assert counters["stats"]["unique_graphs"] == 1
    finally:  # no compiled state left behind for the tests after this one, pass or fail
        torch._dynamo.reset()


def test_flops_per_token_follows_the_6n_plus_attention_formula():
    cfg = tiny()
    expected = 6 * count_parameters(cfg)["matmul"] + 12 * 2 * 64 * 32
    assert flops_per_token(cfg) == expected
    # The matmul parameters leave out only the embedding lookup.
    assert count_parameters(cfg)["total"] - count_parameters(cfg)["matmul"] == 512 * 64


def test_longer_sequence_than_configured_is_refused():
    with pytest.raises(ValueError, match="longer than model.seq_len"):
        Transformer(tiny())(torch.zeros(1, 33, dtype=torch.long))


# The model counts itself: each layer's parameter count against what it allocates, and each
# block's count of saved activations against what autograd actually keeps (saved-tensor hooks).
@pytest.mark.parametrize(
    "kw", [{}, {"n_kv_heads": 1}, {"activation": "gelu"}, {"activation": "geglu"}, {"qk_norm": True, "n_kv_heads": 2}]
)
def test_each_layer_counts_the_parameters_it_allocates(kw):
    from dist_lm.model.layers import MLP, Attention, RMSNorm

    cfg = tiny(**kw)
    numel = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert numel(RMSNorm(cfg.d_model, cfg.norm_eps)) == RMSNorm.parameter_count(cfg.d_model)
    assert numel(Attention(cfg, 0)) == Attention.parameter_count(cfg)
    assert numel(MLP(cfg)) == MLP.parameter_count(cfg)


def saved_bytes(block, x: torch.Tensor, pos, constants: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps for backward in one block's forward, leaving
    out the parameters and ``constants`` (the rotary tables, shared by every layer and batch)."""
    skip = {t.untyped_storage().data_ptr() for t in [*block.parameters(), *constants]}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, pos)
    return sum(kept.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"n_kv_heads": 2},
        {"activation": "gelu"},
        {"activation": "geglu", "n_kv_heads": 1},
        {"qk_norm": True, "n_kv_heads": 2},
        {"qk_norm": True, "n_kv_heads": 2, "head_dim": 32},
    ],
)
def test_a_block_counts_the_activations_autograd_saves(dtype, kw):
    from dist_lm.model.counts import saved_bytes_per_token
    from dist_lm.model.layers import Positions, rope_tables
    from dist_lm.model.transformer import Block

    cfg = tiny(**kw)
    block = Block(cfg, 0).to(dtype)
    batch, tokens = 2, cfg.seq_len
    x = torch.randn(batch, tokens, cfg.d_model, dtype=dtype, requires_grad=True)
    rope = rope_tables(cfg)
    act_bytes = torch.finfo(dtype).bits // 8
    per_block, _ = saved_bytes_per_token(cfg, act_bytes)
    assert saved_bytes(block, x, Positions(rope, None, None), list(rope)) == per_block * batch * tokens
