"""The whole model's counts, summed from each layer's own (dist_lm.model.layers, .moe,
.transformer): parameters, training FLOPs per token, what a block keeps for backward, and the
state dict's shapes. Config in, numbers out: no model is built except on the meta device."""

from __future__ import annotations

import torch
from torch import nn

from dist_lm.config.schema import ModelConfig
from dist_lm.model.layers import MLP, Attention, RMSNorm
from dist_lm.model.moe import ExpertsMLP
from dist_lm.model.positional import RelativeBias
from dist_lm.model.transformer import Block, Transformer


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """total: unique parameters (a tied head is not counted twice). matmul: the parameters that
    take part in a matrix multiply per token, i.e. everything but the embedding lookup; the
    output head is always one, tied or not; a block of experts counts the experts a token takes."""
    d, V = cfg.d_model, cfg.vocab_size
    n_moe = (cfg.layer_types or []).count("moe")
    n_dense = cfg.n_layers - n_moe
    shared = cfg.n_layers * (Attention.parameter_count(cfg) + 2 * RMSNorm.parameter_count(d)) + RMSNorm.parameter_count(
        d
    )
    body_total = shared + n_dense * MLP.parameter_count(cfg) + n_moe * ExpertsMLP.parameter_count(cfg)
    body_active = shared + n_dense * MLP.parameter_count(cfg) + n_moe * ExpertsMLP.active_parameter_count(cfg)
    positions = (cfg.seq_len * d if cfg.position == "learned" else 0) + (
        RelativeBias.parameter_count(cfg.n_heads, cfg.bias_num_basis) if cfg.position == "bias" else 0
    )
    head = V * d
    return {"total": V * d + body_total + positions + (0 if cfg.tie_embeddings else head), "matmul": body_active + head}


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token (forward + backward), the figure MFU is computed from: 6 per
    matmul parameter, plus attention's score and value products in every block."""
    return 6.0 * count_parameters(cfg)["matmul"] + cfg.n_layers * Attention.attention_flops_per_token(cfg)


def saved_bytes_per_token(cfg: ModelConfig, act_bytes: int, compiled: bool = False) -> tuple[float, float]:
    """Bytes one block keeps for backward per token, and bytes of the block's input alone (what
    activation checkpointing keeps instead), for activations of ``act_bytes`` bytes."""
    return Block.saved_bytes_per_token(cfg, act_bytes, compiled), act_bytes * cfg.d_model


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in the model's state dict, from a model built on the meta device
    (no memory); a mixture-of-experts layer counts as model.n_experts MLPs."""
    with torch.device("meta"):
        model = Transformer(cfg, moe_layer=lambda _: nn.ModuleList(MLP(cfg) for _ in range(cfg.n_experts)))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}
