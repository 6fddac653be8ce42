"""A decoder-only transformer of the Llama family: RMSNorm, rotary embeddings, grouped-query
attention through scaled_dot_product_attention, SwiGLU (or GeGLU / GELU) MLPs, no biases.

This file is architecture only: it knows nothing of DeepSpeed, ranks or config files.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dist_lm.config import ModelConfig


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
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # enable_gqa lets the fused kernels read the shared K/V heads without copying them.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
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


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be resolved before building the model")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Recompute each block in backward; set from outside (see dist_lm.engine).
        self.activation_checkpointing = False
        # Rotary tables are kept out of the module's buffers so that casting the model to bf16/fp16
        # (as DeepSpeed does) cannot round them: they are made in fp32 on first use per device.
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        # Residual-branch outputs are scaled down so the residual stream's variance does not grow
        # with depth (GPT-2 / Llama practice); small logits make a fresh model's loss ~ln(vocab).
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norm weights keep their ones
            nn.init.normal_(p, mean=0.0, std=residual_std if name.endswith(("wo.weight", "w_out.weight")) else std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, seq, vocab) or, with targets, the mean cross-entropy loss."""
        t = idx.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than model.seq_len={self.cfg.seq_len}")
        if self._rope is None or self._rope[0].device != idx.device:
            self._rope = rope_tables(self.cfg.head_dim, self.cfg.seq_len, self.cfg.rope_theta, idx.device)
        cos, sin = self._rope[0][:t], self._rope[1][:t]
        x = self.tok_embeddings(idx)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        logits = self.output(self.norm(x))
        if targets is None:
            return logits
        # Cross-entropy in fp32: bf16 logits lose the small differences the loss depends on.
        return F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1))


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from the shapes alone (no model needed).

    total: unique parameters (a tied head is not counted twice). matmul: the parameters that
    take part in a matrix multiply per token, i.e. everything but the embedding lookup; the
    output head is always one, tied or not.
    """
    d, f, L, V = cfg.d_model, cfg.ffn_dim, cfg.n_layers, cfg.vocab_size
    attn = 2 * d * cfg.n_heads * cfg.head_dim + 2 * d * cfg.kv_heads * cfg.head_dim
    mlp = d * f * (3 if cfg.activation in ("swiglu", "geglu") else 2)
    body = L * (attn + mlp + 2 * d) + d  # blocks, their two norms each, and the final norm
    head = V * d
    return {"total": V * d + body + (0 if cfg.tie_embeddings else head), "matmul": body + head}


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token (forward + backward), the figure MFU is computed from.

    6 per matmul parameter, plus attention's 12 * n_layers * d_model * seq_len (PaLM, appendix B),
    counted without the causal halving, as PaLM and nanoGPT do.
    """
    return 6.0 * count_parameters(cfg)["matmul"] + 12.0 * cfg.n_layers * cfg.d_model * cfg.seq_len
