"""The config section of what is trained: the model (a decoder-only transformer of the Llama
family). Frozen, typed, a docstring per field, as every section (dist_lm.config.schema gathers
them into Config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dist_lm.config.errors import require


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer of the Llama family."""

    vocab_size: int | None = None
    """Vocabulary size. null: taken from the data's tokenizer, rounded up to a multiple of 64."""
    seq_len: int = 256
    """Context length in tokens; training windows are this long."""
    d_model: int = 256
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Number of query heads; must divide d_model unless head_dim is set."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; must divide n_heads. null: n_heads (plain MHA)."""
    head_dim: int | None = None
    """Width of each attention head. null: d_model / n_heads (Llama, Mistral); Qwen3 sets it apart
    (e.g. 128 beside d_model=1024 and 16 heads)."""
    ffn_hidden: int | None = None
    """Hidden width of the MLP. null: 8/3 * d_model for gated activations (4 * d_model for gelu),
    rounded up to ffn_multiple_of."""
    ffn_multiple_of: int = 64
    """The derived ffn_hidden is rounded up to a multiple of this (tensor-core friendly shapes)."""
    activation: Literal["swiglu", "geglu", "gelu"] = "swiglu"
    """MLP type: SwiGLU (Llama), GeGLU, or a plain GELU MLP."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    rope_scaling: Literal["none", "llama3"] = "none"
    """Scaling of the rotary frequencies: none, or Llama 3.1's (llama3: low frequencies divided by
    rope_scaling_factor, high ones kept, a smooth ramp between), which model.init_from sets from a
    Llama 3.x config.json."""
    rope_scaling_factor: float = 8.0
    """llama3 scaling: what the lowest frequencies are divided by."""
    rope_scaling_low_freq_factor: float = 1.0
    """llama3 scaling: wavelengths above rope_scaling_original_seq_len / this are scaled fully."""
    rope_scaling_high_freq_factor: float = 4.0
    """llama3 scaling: wavelengths below rope_scaling_original_seq_len / this are kept."""
    rope_scaling_original_seq_len: int = 8192
    """llama3 scaling: the context the frequencies were first trained at."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm."""
    tie_embeddings: bool = False
    """Share the token embedding matrix with the output head."""
    init_std: float = 0.02
    """Standard deviation of the weight initialisation; residual output projections are further
    scaled by 1/sqrt(2 * n_layers)."""
    position: Literal["rope", "learned", "none", "bias"] = "rope"
    """Positions: rotary embeddings; learned absolute embeddings; none (causal attention alone);
    or bias, a learned per-head additive attention bias built from an orthonormal basis of the
    relative distance (bias_basis)."""
    bias_basis: Literal[
        "fourier", "chebyshev", "legendre", "hermite", "laguerre", "wavelet", "sinc", "rbf", "bessel"
    ] = "legendre"
    """The basis of position=bias (wavelet: Morlet; rbf: Gaussian bumps; both orthonormalised)."""
    bias_num_basis: int = 16
    """Basis functions (learned coefficients per head) of position=bias."""
    layer_types: list[str] = field(default_factory=list)
    """Per block, mlp or moe (a mixture of experts, through DeepSpeed's MoE layer), e.g.
    [mlp, mlp, moe, moe]; on the command line model.layer_types=mlp,moe. Empty: all mlp."""
    n_experts: int = 8
    """Experts per moe layer."""
    moe_top_k: int = 2
    """Experts each token is routed to (1 or 2)."""
    moe_capacity_factor: float = 1.25
    """Tokens an expert takes per batch, as a multiple of an even share; the rest are dropped."""
    moe_aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss added to the training loss."""
    dropout: float = 0.0
    """Dropout probability of the attention weights and of each block's two residual branches
    while training (nanoGPT's attn and resid dropout); 0 turns it off. Off in an export."""
    qk_norm: bool = False
    """RMSNorm on each head's queries and keys before the rotary embedding (as Qwen3, and OLMo 2
    over whole projections, do against attention-logit growth). Exports as Qwen3ForCausalLM."""
    init_from: str | None = None
    """A Hugging Face model directory (config.json, safetensors, tokenizer.json) of a Llama,
    Mistral or Qwen3 model to continue pretraining: its config.json sets the architecture keys
    (a key also set in your config file or on the command line must agree; a preset's give way),
    a fresh run starts from its weights, and the data must be prepared with its tokenizer
    (docs/continued-pretraining.md). A resumed run loads its own checkpoint, not these weights."""
    cross_entropy: Literal["auto", "full", "chunked"] = "auto"
    """How the training loss is computed from the output head's logits. full: the logits in fp32
    (eager: the cast, the log-softmax and its gradient, each a tokens x vocab fp32 tensor;
    compiled, fused without them). chunked: DeepSpeed's chunked cross-entropy (a Triton kernel on
    GPUs), which reads the logits in their own dtype and never holds them in fp32. auto: chunked
    in an eager GPU run from a vocabulary of dist_lm.model.loss.CHUNKED_FROM_VOCAB tokens, full
    otherwise (docs/benchmarks.md: no faster and no lighter than the compiled full loss)."""

    def __post_init__(self) -> None:
        require(self.vocab_size is None or self.vocab_size > 0, "vocab_size", "must be a positive integer or null")
        for name in ("seq_len", "d_model", "n_layers", "n_heads", "ffn_multiple_of"):
            require(getattr(self, name) > 0, name, "must be a positive integer")
        if self.head_dim is None:
            require(
                self.d_model % self.n_heads == 0,
                "n_heads",
                f"must divide d_model={self.d_model} (got {self.n_heads}), or set model.head_dim",
            )
            require(
                (self.d_model // self.n_heads) % 2 == 0,
                "n_heads",
                f"head dimension d_model/n_heads={self.d_model // self.n_heads} must be even for rotary embeddings",
            )
        else:
            require(
                self.head_dim > 0 and self.head_dim % 2 == 0,
                "head_dim",
                f"must be a positive even number (rotary embeddings rotate pairs), got {self.head_dim}",
            )
        if self.n_kv_heads is not None:
            require(
                self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0,
                "n_kv_heads",
                f"must divide n_heads={self.n_heads} (got {self.n_kv_heads})",
            )
        require(self.ffn_hidden is None or self.ffn_hidden > 0, "ffn_hidden", "must be a positive integer or null")
        require(self.rope_theta > 0, "rope_theta", "must be positive")
        require(self.norm_eps > 0, "norm_eps", "must be positive")
        require(self.rope_scaling_factor >= 1, "rope_scaling_factor", "must be at least 1")
        require(
            0 < self.rope_scaling_low_freq_factor < self.rope_scaling_high_freq_factor,
            "rope_scaling_high_freq_factor",
            f"must exceed rope_scaling_low_freq_factor={self.rope_scaling_low_freq_factor}, both positive",
        )
        require(self.rope_scaling_original_seq_len > 0, "rope_scaling_original_seq_len", "must be a positive integer")
        require(self.init_std > 0, "init_std", "must be positive")
        require(self.bias_num_basis > 0, "bias_num_basis", "must be positive")
        require(
            not self.layer_types or len(self.layer_types) == self.n_layers,
            "layer_types",
            f"must list one type per block (n_layers={self.n_layers}), or be empty",
        )
        bad = [t for t in self.layer_types if t not in ("mlp", "moe")]
        require(not bad, "layer_types", f"each entry is mlp or moe, not {bad}")
        require(self.n_experts >= 2, "n_experts", "must be at least 2")
        require(self.moe_top_k in (1, 2), "moe_top_k", "DeepSpeed's MoE routes to 1 or 2 experts")
        require(self.moe_capacity_factor > 0, "moe_capacity_factor", "must be positive")
        require(self.moe_aux_loss_coef >= 0, "moe_aux_loss_coef", "must be >= 0")
        require(0 <= self.dropout < 1, "dropout", "must be in [0, 1) (0 turns dropout off)")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        """Each attention head's width: model.head_dim, or d_model / n_heads."""
        return self.head_dim or self.d_model // self.n_heads

    @property
    def attention_width(self) -> int:
        """The width of all query heads together (d_model unless model.head_dim says otherwise)."""
        return self.n_heads * self.head_size

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = 4 * self.d_model if self.activation == "gelu" else int(8 * self.d_model / 3)
        m = self.ffn_multiple_of
        return (hidden + m - 1) // m * m
