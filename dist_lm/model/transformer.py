"""A decoder-only transformer of the Llama family: RMSNorm, rotary embeddings (or learned
absolute positions, none, or a learned relative bias from an orthonormal basis), grouped-query
attention through scaled_dot_product_attention, SwiGLU (or GeGLU / GELU) MLPs, no biases; a
key/value cache for generation.

This file is architecture only: it knows nothing of DeepSpeed, ranks or config files. A
mixture-of-experts layer comes from outside (``moe_layer``), as a module that maps (batch, seq,
d_model) to the same and leaves its load-balancing loss in ``.aux_loss``, which the forward
returns among the loss's parts. How it computes while training (activation checkpointing, the
z-loss, a chunked cross-entropy, autocast, a share of each window under sequence parallelism) is
a TrainingOptions given when it is built or by the engine through :meth:`Transformer.use`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dist_lm.config.schema import ModelConfig
from dist_lm.model.documents import document_attention
from dist_lm.model.layers import MLP, Attention, KVCache, Positions, RMSNorm, rope_tables
from dist_lm.model.loss import LossParts, MlpRunner, TrainingOptions, language_model_loss
from dist_lm.model.positional import RelativeBias


class Block(nn.Module):
    @staticmethod
    def saved_bytes_per_token(cfg: ModelConfig, act_bytes: int, compiled: bool) -> float:
        """What one block keeps for backward per token: its two norms, attention and MLP (a block
        of experts is counted as one dense MLP; its routing is not modelled), and with dropout the
        one-byte masks of its two residual branches. The residual adds keep nothing."""
        masks = 2 * cfg.d_model if cfg.dropout else 0
        return (
            2 * RMSNorm.saved_bytes_per_token(cfg.d_model, act_bytes, compiled)
            + masks
            + Attention.saved_bytes_per_token(cfg, act_bytes, compiled)
            + MLP.saved_bytes_per_token(cfg, act_bytes, compiled)
        )

    def __init__(self, cfg: ModelConfig, layer: int, mlp: nn.Module | None = None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = mlp if mlp is not None else MLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.mlp_runner: MlpRunner | None = None  # TrainingOptions.mlp_runner, for a dense MLP (Transformer.use)

    def forward(self, x: torch.Tensor, pos: Positions) -> torch.Tensor:
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), pos))
        h = self.mlp_norm(x)
        return x + self.resid_dropout(self.mlp(h) if self.mlp_runner is None else self.mlp_runner(self.mlp, h))


class Transformer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        moe_layer: Callable[[int], nn.Module] | None = None,
        options: TrainingOptions = TrainingOptions(),  # noqa: B008 (frozen: one shared default is safe)
    ):
        """``moe_layer(i)`` builds the mixture-of-experts MLP of block i, for the blocks that
        model.layer_types marks ``moe``. ``options``: how it computes (or later: :meth:`use`)."""
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be resolved before building the model")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embeddings = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.relative_bias = (
            RelativeBias(cfg.n_heads, cfg.bias_basis, cfg.bias_num_basis, cfg.seq_len)
            if cfg.position == "bias"
            else None
        )
        types = cfg.layer_types or ["mlp"] * cfg.n_layers
        if "moe" in types and moe_layer is None:
            raise ValueError("model.layer_types has moe layers: pass moe_layer to build them")
        self.blocks = nn.ModuleList(
            Block(cfg, i, moe_layer(i) if kind == "moe" else None) for i, kind in enumerate(types)
        )
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        self.use(options)
        # Rotary tables are kept out of the module's buffers so that casting the model to bf16/fp16
        # (as DeepSpeed does) cannot round them. They are made in fp32 here and again whenever the
        # module moves (_apply), not in forward: made on forward's first call, inside a compiled
        # forward, torch.compile compiled the whole model a second time at the second call (its
        # guard on the empty cache failed), and under CUDA graphs they were a graph output that the
        # next replay overwrote.
        self._rope = self._rope_tables(None)
        self.reset_parameters()

    def use(self, options: TrainingOptions) -> None:
        """How to compute from now on: what the engine decides once it knows the run (activation
        checkpointing, the z-loss, DeepSpeed's chunked cross-entropy and tiled MLP, a share of
        each window). The one way in after
        construction; nothing else sets the model's behaviour from outside."""
        self.options = options
        for block in self.blocks:  # (experts keep their own forward: DeepSpeed's MoE layer dispatches tokens)
            block.mlp_runner = options.mlp_runner if isinstance(block.mlp, MLP) else None

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        # Residual-branch outputs are scaled down so the residual stream's variance does not grow
        # with depth (GPT-2 / Llama practice); small logits make a fresh model's loss ~ln(vocab).
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2 or "relative_bias" in name:
                continue  # norm weights keep their ones, the bias coefficients their zeros
            nn.init.normal_(p, mean=0.0, std=residual_std if name.endswith(("wo.weight", "w_out.weight")) else std)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        documents: torch.Tensor | None = None,
    ) -> torch.Tensor | LossParts:
        """Logits (batch, seq, vocab) or, with targets, the loss and its parts (LossParts: the total
        to train on, the cross-entropy, the z-loss and the experts' load-balancing loss). With a
        cache, idx continues the cached tokens.
        ``documents`` (batch, seq): each token's document in a packed window
        (dist_lm.model.documents.document_ids): attention stays inside each document and positions
        restart at each."""
        autocast = self.options.autocast_dtype
        if autocast is not None and not torch.is_autocast_enabled(idx.device.type):
            with torch.autocast(idx.device.type, dtype=autocast):
                return self.forward(idx, targets, cache, documents)
        start, t = (cache.length if cache is not None else 0), idx.shape[1]
        if start + t > self.cfg.seq_len:
            raise ValueError(f"sequence of {start + t} tokens is longer than model.seq_len={self.cfg.seq_len}")
        # Under sequence parallelism the blocks run on this rank's share of the window; the
        # positions and the document structure are the whole window's, which attention sees.
        shard = self.options.sequence_shard if cache is None else None
        mine = shard.of if shard is not None else (lambda tokens: tokens)
        x = self.tok_embeddings(mine(idx))
        packed = document_attention(documents) if documents is not None else None
        if self.pos_embeddings is not None:
            positions = packed.positions if packed is not None else torch.arange(start, start + t, device=idx.device)
            x = x + self.pos_embeddings(mine(positions.expand(idx.shape[0], -1)))
        rope = self._rope_for(start, t, idx.device)
        if rope is not None and packed is not None:  # each token's own position: (batch, 1, seq, head_dim / 2)
            rope = tuple(table[packed.positions].unsqueeze(1) for table in self._rope)
        pos = Positions(rope, None, cache, packed)
        if self.relative_bias is not None:
            pos.bias = self.relative_bias(start, t, start + t, x.dtype, idx.device)
        for block in self.blocks:
            if self.options.activation_checkpointing and self.training:
                x = checkpoint(block, x, pos, use_reentrant=False)
            else:
                x = block(x, pos)
        if cache is not None:
            cache.length += t
        if targets is None:
            return self.lm_head(self.norm(x))
        total, cross_entropy, z = self.head_loss(x, mine(targets))
        if shard is not None:  # this share's part of the window's mean: the shares sum to it
            total, cross_entropy = total / shard.count, cross_entropy / shard.count
            z = z / shard.count if z is not None else None
        aux = [block.mlp.aux_loss for block in self.blocks if getattr(block.mlp, "aux_loss", None) is not None]
        aux = torch.stack(aux).sum().float() if aux else None
        if aux is not None:
            total = total + self.cfg.moe_aux_loss_coef * aux
        return LossParts(total, cross_entropy, z, aux)

    def head_loss(
        self, x: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The last block's output -> (loss to train on, cross-entropy, z-loss or None): the final
        norm, the output head and the loss (dist_lm.model.loss), one region for compile_regions."""
        options = self.options
        return language_model_loss(self.lm_head(self.norm(x)), targets, options.z_loss_coef, options.row_losses)

    def compile_regions(self) -> None:
        """torch.compile the repeated block and the output (head and loss), not the whole model:
        blocks of one class share one compiled graph, so a 24-block model compiles about what a
        one-block model does, and the embedding and the document structure stay eager."""
        for block in self.blocks:
            block.compile()
        self.head_loss = torch.compile(self.head_loss)

    def _rope_tables(self, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.cfg.position != "rope":
            return None
        return rope_tables(self.cfg, device)

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .bfloat16(): the tables follow the device only
        super()._apply(fn, recurse)
        self._rope = self._rope_tables(self.tok_embeddings.weight.device)
        return self

    def _rope_for(self, start: int, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._rope is None:
            return None
        if self._rope[0].device != device:  # parameters moved one by one, past _apply
            self._rope = self._rope_tables(device)
        return self._rope[0][start : start + t], self._rope[1][start : start + t]
