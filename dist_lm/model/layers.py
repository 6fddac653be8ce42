"""The layers of the transformer: RMSNorm, rotary embeddings, grouped-query attention, the MLP,
and the key/value cache of generation.

Each layer counts itself from the config alone (static methods, no instance needed): its
parameters, and the bytes per token that autograd keeps for backward, eager or compiled. The
whole model's counts (dist_lm.model.counts) and the memory model (dist_lm.plan.memory) sum these,
and tests/test_model.py holds them to what the layers allocate and save.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dist_lm.config.schema import ModelConfig


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
    @staticmethod
    def parameter_count(dim: int) -> int:
        return dim

    @staticmethod
    def saved_bytes_per_token(
        dim: int, act_bytes: int, compiled: bool, rows: int = 1, output_kept: bool = True
    ) -> float:
        """What autograd keeps for backward, for ``rows`` vectors of ``dim`` per token (the heads,
        for a per-head norm). Eager: the fp32 input (x.float(), a copy unless it is fp32 already),
        the normalised tensor in the compute dtype (the weight multiply keeps it), the output when
        the next op keeps it (a matmul does; the rotary embedding does not), and the fp32
        reciprocal RMS of each row. Compiled: the input, the output, and the reciprocal RMS."""
        output = act_bytes * dim if output_kept else 0
        return (act_bytes if compiled else 4 + act_bytes) * dim + output + 4 * rows

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the compute dtype: bf16 loses too much in the mean of squares.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.weight


def rope_tables(cfg: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (seq_len, head_size / 2), with model.rope_scaling's frequencies."""
    head_dim = cfg.head_size
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if cfg.rope_scaling == "llama3":
        inv_freq = llama3_frequencies(inv_freq, cfg)
    angles = torch.outer(torch.arange(cfg.seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def llama3_frequencies(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Llama 3.1's long-context scaling (as transformers' ``_compute_llama3_parameters``, which
    the import's logits check holds us to): wavelengths longer than original_seq_len /
    low_freq_factor are stretched by the factor, those shorter than original_seq_len /
    high_freq_factor kept, and the ones between interpolated smoothly."""
    factor, low, high = cfg.rope_scaling_factor, cfg.rope_scaling_low_freq_factor, cfg.rope_scaling_high_freq_factor
    original = cfg.rope_scaling_original_seq_len
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x (batch, heads, seq, head_dim)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


class Attention(nn.Module):
    @staticmethod
    def parameter_count(cfg: ModelConfig) -> int:
        norms = 2 * RMSNorm.parameter_count(cfg.head_size) if cfg.qk_norm else 0
        return 2 * cfg.d_model * cfg.n_heads * cfg.head_size + 2 * cfg.d_model * cfg.kv_heads * cfg.head_size + norms

    @staticmethod
    def attention_flops_per_token(cfg: ModelConfig) -> float:
        """The score and value products' training FLOPs per token, beside its matmul parameters'
        6 each: 12 x d_model x seq_len (PaLM, appendix B; d_model there is the heads' width, which
        model.head_dim can set apart), without the causal halving, as PaLM and nanoGPT count it."""
        return 12.0 * cfg.attention_width * cfg.seq_len

    @staticmethod
    def saved_bytes_per_token(cfg: ModelConfig, act_bytes: int, compiled: bool) -> float:
        """q, k and v after rotation, the attention output and its re-laid-out copy that enters wo
        (its input, the norm's output, is the norm's count), in the compute dtype, and the fp32
        log-sum-exp per head that the fused kernels keep; the same compiled. With model.qk_norm, the
        two per-head norms (their outputs go on to the rotary embedding, which does not keep them).
        Attention dropout adds nothing here: the fused GPU kernels keep only their random state
        (torch's math path, which CPUs take with dropout, keeps the attention weights)."""
        qd, kvd = cfg.attention_width, cfg.kv_heads * cfg.head_size
        norms = 0.0
        if cfg.qk_norm:
            norms = RMSNorm.saved_bytes_per_token(
                qd, act_bytes, compiled, cfg.n_heads, output_kept=False
            ) + RMSNorm.saved_bytes_per_token(kvd, act_bytes, compiled, cfg.kv_heads, output_kept=False)
        return act_bytes * (3 * qd + 2 * kvd) + 4 * cfg.n_heads + norms

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_size
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_size, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_size, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_size, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_size, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_size, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_size, cfg.norm_eps) if cfg.qk_norm else None
        self.attend: nn.Module = LocalAttention(layer, cfg.dropout)
        """The seam: what attends, given q, k, v (see LocalAttention)."""

    def forward(self, x: torch.Tensor, pos: "Positions") -> torch.Tensor:
        b, t, _ = x.shape
        # The head counts come from the projections' widths (-1), not the config: under tensor
        # parallelism a rank's projections hold its share of the heads.
        q = self.wq(x).view(b, t, -1, self.head_dim)
        k = self.wk(x).view(b, t, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.wv(x).view(b, t, -1, self.head_dim)
        return self.wo(self.attend(q, k, v, pos).reshape(b, t, -1))


class LocalAttention(nn.Module):
    """Attention's seam (Attention.attend): (batch, seq, heads, head_dim) queries, keys and
    values, before the rotary embedding, in; the attention output in the same layout out. This
    one attends over the tokens it is given. Under sequence parallelism dist_lm.runtime.parallel
    plugs DeepSpeed's Ulysses all-to-all in front of it, which hands it the whole window for a
    share of the heads: so the rotary embedding, the cache, the masks and the document structure
    here all see whole windows, whatever the layout."""

    def __init__(self, layer: int, dropout: float):
        super().__init__()
        self.layer, self.dropout = layer, dropout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: "Positions") -> torch.Tensor:
        t = q.shape[1]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if pos.rope is not None:
            q, k = apply_rope(q, *pos.rope), apply_rope(k, *pos.rope)
        if pos.cache is not None:
            k, v = pos.cache.extend(self.layer, k, v)
        if pos.bias is not None:  # the causal mask is in the bias
            mask, causal = pos.bias, False
        elif t == k.shape[2]:
            mask, causal = None, True
        else:  # new queries against cached keys: each sees the keys up to its own position
            mask, causal = torch.ones(t, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - t), False
        # enable_gqa lets the fused kernels read the shared K/V heads without copying them.
        gqa = k.shape[1] != q.shape[1]
        if pos.documents is not None:
            y = pos.documents.attend(q, k, v, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=causal,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=gqa,
            )
        return y.transpose(1, 2)


class MLP(nn.Module):
    @staticmethod
    def parameter_count(cfg: ModelConfig) -> int:
        return cfg.d_model * cfg.ffn_dim * (3 if cfg.activation in ("swiglu", "geglu") else 2)

    @staticmethod
    def saved_bytes_per_token(cfg: ModelConfig, act_bytes: int, compiled: bool) -> float:
        """Gated, eager: gate, up, the activation and the product (4 x ffn); compiled, the
        activation is recomputed (3 x ffn). Plain GELU: its input and output (2 x ffn)."""
        gated = cfg.activation in ("swiglu", "geglu")
        return act_bytes * cfg.ffn_dim * ((3 if compiled else 4) if gated else 2)

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

    def __init__(
        self,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        bias: torch.Tensor | None,
        cache: KVCache | None,
        documents=None,
    ):
        """``documents``: a DocumentAttention (dist_lm.model.documents) for a packed window whose
        documents attend apart; then ``rope`` holds per-token tables (batch, 1, seq, head_dim/2)."""
        self.rope, self.bias, self.cache, self.documents = rope, bias, cache, documents
