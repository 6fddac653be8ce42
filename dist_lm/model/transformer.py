"""A decoder-only transformer of the Llama family: RMSNorm, rotary embeddings (or learned
absolute positions, none, or a learned relative bias from an orthonormal basis), grouped-query
attention through scaled_dot_product_attention, SwiGLU (or GeGLU / GELU) MLPs, no biases; a
key/value cache for generation.

This file is architecture only: it knows nothing of DeepSpeed, ranks or config files. A
mixture-of-experts layer comes from outside (``moe_layer``), as a module that maps (batch, seq,
d_model) to the same and leaves its load-balancing loss in ``.aux_loss``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dist_lm.config.schema import ModelConfig
from dist_lm.model.positional import RelativeBias


class KVCache:
    """Keys and values of the tokens seen so far, per layer, for generation one token at a time."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.length = 0

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.keys:
            k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the compute dtype: bf16 loses too much in the mean of squares.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.weight


def rope_tables(head_dim: int, seq_len: int, theta: float, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (seq_len, head_dim / 2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x (batch, heads, seq, head_dim)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, pos: "Positions") -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if pos.rope is not None:
            q, k = apply_rope(q, *pos.rope), apply_rope(k, *pos.rope)
        if pos.cache is not None:
            k, v = pos.cache.extend(self.layer, k, v)
        if pos.bias is not None:  # the causal mask is in the bias
            mask, causal = pos.bias, False
        elif t == k.shape[2]:
            mask, causal = None, True
        else:  # new queries against cached keys: each sees the keys up to its own position
            mask, causal = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - t), False
        # enable_gqa lets the fused kernels read the shared K/V heads without copying them.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.activation = cfg.activation
        gated = cfg.activation in ("swiglu", "geglu")
        self.w_in = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.w_gate = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False) if gated else None
        self.w_out = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            h = F.silu(self.w_gate(x)) * self.w_in(x)
        elif self.activation == "geglu":
            h = F.gelu(self.w_gate(x), approximate="tanh") * self.w_in(x)
        else:
            h = F.gelu(self.w_in(x), approximate="tanh")
        return self.w_out(h)


class Positions:
    """What attention needs to know of positions for one forward pass."""

    def __init__(self, rope: tuple[torch.Tensor, torch.Tensor] | None, bias: torch.Tensor | None,
                 cache: KVCache | None):
        self.rope, self.bias, self.cache = rope, bias, cache


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, mlp: nn.Module | None = None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = mlp if mlp is not None else MLP(cfg)

    def forward(self, x: torch.Tensor, pos: Positions) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), pos)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_layer: Callable[[int], nn.Module] | None = None):
        """``moe_layer(i)`` builds the mixture-of-experts MLP of block i, for the blocks that
        model.layer_types marks ``moe``."""
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be resolved before building the model")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embeddings = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.relative_bias = RelativeBias(cfg.n_heads, cfg.bias_basis, cfg.bias_num_basis, cfg.seq_len) \
            if cfg.position == "bias" else None
        types = cfg.layer_types or ["mlp"] * cfg.n_layers
        if "moe" in types and moe_layer is None:
            raise ValueError("model.layer_types has moe layers: pass moe_layer to build them")
        self.blocks = nn.ModuleList(Block(cfg, i, moe_layer(i) if kind == "moe" else None)
                                    for i, kind in enumerate(types))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        # Recompute each block in backward; set from outside (see dist_lm.runtime.engine).
        self.activation_checkpointing = False
        # Rotary tables are kept out of the module's buffers so that casting the model to bf16/fp16
        # (as DeepSpeed does) cannot round them: they are made in fp32 on first use per device.
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.aux_loss: torch.Tensor | None = None  # the experts' load-balancing loss of the last forward
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        # Residual-branch outputs are scaled down so the residual stream's variance does not grow
        # with depth (GPT-2 / Llama practice); small logits make a fresh model's loss ~ln(vocab).
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2 or "relative_bias" in name:
                continue  # norm weights keep their ones, the bias coefficients their zeros
            nn.init.normal_(p, mean=0.0, std=residual_std if name.endswith(("wo.weight", "w_out.weight")) else std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Logits (batch, seq, vocab) or, with targets, the mean cross-entropy loss (plus the
        experts' load-balancing loss, if any). With a cache, idx continues the cached tokens."""
        start, t = (cache.length if cache is not None else 0), idx.shape[1]
        if start + t > self.cfg.seq_len:
            raise ValueError(f"sequence of {start + t} tokens is longer than model.seq_len={self.cfg.seq_len}")
        x = self.tok_embeddings(idx)
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(torch.arange(start, start + t, device=idx.device))
        pos = Positions(self._rope_for(start, t, idx.device), None, cache)
        if self.relative_bias is not None:
            pos.bias = self.relative_bias(start, t, start + t, x.dtype, idx.device)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, pos, use_reentrant=False)
            else:
                x = block(x, pos)
        if cache is not None:
            cache.length += t
        logits = self.lm_head(self.norm(x))
        aux = [block.mlp.aux_loss for block in self.blocks if getattr(block.mlp, "aux_loss", None) is not None]
        self.aux_loss = torch.stack(aux).sum() if aux else None
        if targets is None:
            return logits
        # Cross-entropy in fp32: bf16 logits lose the small differences the loss depends on.
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1))
        if self.aux_loss is not None:
            loss = loss + self.cfg.moe_aux_loss_coef * self.aux_loss.float()
        return loss

    def _rope_for(self, start: int, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.cfg.position != "rope":
            return None
        if self._rope is None or self._rope[0].device != device:
            self._rope = rope_tables(self.cfg.head_dim, self.cfg.seq_len, self.cfg.rope_theta, device)
        return self._rope[0][start:start + t], self._rope[1][start:start + t]


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in the model's state dict, from a model built on the meta device
    (no memory); a mixture-of-experts layer counts as model.n_experts MLPs."""
    with torch.device("meta"):
        model = Transformer(cfg, moe_layer=lambda _: nn.ModuleList(MLP(cfg) for _ in range(cfg.n_experts)))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from the shapes alone (no model needed).

    total: unique parameters (a tied head is not counted twice). matmul: the parameters that
    take part in a matrix multiply per token, i.e. everything but the embedding lookup; the
    output head is always one, tied or not.
    """
    d, f, L, V = cfg.d_model, cfg.ffn_dim, cfg.n_layers, cfg.vocab_size
    attn = 2 * d * cfg.n_heads * cfg.head_dim + 2 * d * cfg.kv_heads * cfg.head_dim
    mlp = d * f * (3 if cfg.activation in ("swiglu", "geglu") else 2)
    n_moe = (cfg.layer_types or []).count("moe")
    # An MoE layer holds n_experts MLPs and a router; a token passes through top_k of them.
    moe_total, moe_active = cfg.n_experts * mlp + d * cfg.n_experts, cfg.moe_top_k * mlp + d * cfg.n_experts
    shared = L * (attn + 2 * d) + d  # attention, the blocks' two norms each, and the final norm
    body_total = shared + (L - n_moe) * mlp + n_moe * moe_total
    body_active = shared + (L - n_moe) * mlp + n_moe * moe_active
    head = V * d
    positions = (cfg.seq_len * d if cfg.position == "learned" else 0) + \
        (cfg.n_heads * cfg.bias_num_basis if cfg.position == "bias" else 0)
    return {"total": V * d + body_total + positions + (0 if cfg.tie_embeddings else head),
            "matmul": body_active + head}


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token (forward + backward), the figure MFU is computed from.

    6 per matmul parameter, plus attention's 12 * n_layers * d_model * seq_len (PaLM, appendix B),
    counted without the causal halving, as PaLM and nanoGPT do.
    """
    return 6.0 * count_parameters(cfg)["matmul"] + 12.0 * cfg.n_layers * cfg.d_model * cfg.seq_len
