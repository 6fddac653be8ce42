"""The training loss from the output head's logits: the mean next-token cross-entropy, plus
the z-loss (optim.z_loss) when it is on.

Two ways to the same numbers (model.cross_entropy). full: the logits are cast to fp32 and given
to cross_entropy, which keeps an fp32 log-softmax for backward and makes an fp32 gradient; at a
128k vocabulary those are 0.5 MB per token each. chunked: a per-token cross-entropy function from
outside (``row_losses``: DeepSpeed's chunked cross-entropy, handed in by dist_lm.runtime.engine,
since the model knows nothing of DeepSpeed) reads the logits in their own dtype and computes in
fp32 a block of rows at a time, keeping one fp32 log-sum-exp per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from dist_lm.config.schema import ModelConfig
from dist_lm.model.sequence import SequenceShard

CHUNKED_FROM_VOCAB = 65_536
"""model.cross_entropy=auto computes the loss chunked in an eager GPU run from this vocabulary
size (Llama 3's 128k, Qwen's 152k). A compiled run fuses the full loss itself (no fp32 logits are
stored) and was as fast with it as chunked and 1.6 GB lighter at 128k (docs/benchmarks.md)."""

MlpRunner = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
"""(a block's MLP, its (batch, seq, d_model) input) -> its output, computed as the runner sees fit."""
RowLosses = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(tokens, vocab) logits and (tokens,) targets -> (tokens,) fp32 cross-entropy, differentiable."""


class LossParts(NamedTuple):
    """What the model's forward with targets returns: the loss to train on, and what it is made
    of, for the log (which reports the cross-entropy, and the other two apart)."""

    total: torch.Tensor
    """cross_entropy + z_loss_coef x z + moe_aux_loss_coef x aux: what backward takes."""
    cross_entropy: torch.Tensor
    """The mean next-token cross-entropy, in fp32."""
    z: torch.Tensor | None
    """mean(logsumexp(logits)^2), when TrainingOptions.z_loss_coef is on."""
    aux: torch.Tensor | None
    """The experts' load-balancing loss, summed over the moe layers; None without them."""


@dataclass(frozen=True)
class TrainingOptions:
    """How the model computes, beside what it is (ModelConfig): given when it is built, or by the
    engine once it knows them (Transformer.use)."""

    activation_checkpointing: bool = False
    """Recompute each block in backward instead of keeping its activations (while training)."""
    z_loss_coef: float = 0.0
    """The z-loss's weight in the loss to train on (optim.z_loss); 0: not computed."""
    row_losses: RowLosses | None = None
    """The per-token cross-entropy to train with (model.cross_entropy=chunked: DeepSpeed's, handed
    in by dist_lm.runtime.engine); None: the full fp32 cross-entropy."""
    autocast_dtype: torch.dtype | None = None
    """With fp32 weights, run forward under torch.autocast in this dtype, as a bf16-autocast run
    computed (the tools run such a checkpoint so; in training DeepSpeed's torch_autocast does it)."""
    mlp_runner: MlpRunner | None = None
    """How each block runs its (dense) MLP: a function from outside (parallel.tiled_mlp:
    DeepSpeed's TiledMLP, handed in by dist_lm.runtime.engine); None: called as it is."""
    sequence_shard: SequenceShard | None = None
    """Under sequence parallelism, the share of each window this rank computes; the loss parts
    are then this share's part of the window's mean (they sum to it over the shares)."""


def uses_chunked(cfg: ModelConfig, on_gpu: bool, compiled: bool) -> bool:
    """Whether a model of ``cfg`` computes its training loss chunked (model.cross_entropy), on a
    GPU or not, its loss compiled (parallel.compile on a GPU) or eager."""
    if cfg.cross_entropy != "auto":
        return cfg.cross_entropy == "chunked"
    return on_gpu and not compiled and cfg.vocab_size is not None and cfg.vocab_size >= CHUNKED_FROM_VOCAB


def language_model_loss(
    logits: torch.Tensor, targets: torch.Tensor, z_loss_coef: float, row_losses: RowLosses | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(batch, seq, vocab) logits and (batch, seq) targets -> (the loss to train on: the mean
    cross-entropy plus ``z_loss_coef`` times the z-loss; the cross-entropy; the z-loss
    mean(logsumexp(logits)^2), or None when its weight is 0)."""
    targets = targets.reshape(-1)
    if row_losses is None:
        # Cross-entropy in fp32: bf16 logits lose the small differences the loss depends on.
        logits = logits.float().flatten(0, 1)
        loss = F.cross_entropy(logits, targets)
        if not z_loss_coef:
            return loss, loss, None
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return loss + z_loss_coef * z, loss, z
    logits = logits.flatten(0, 1)
    rows = row_losses(logits, targets)
    loss = rows.mean()
    if not z_loss_coef:
        return loss, loss, None
    # logsumexp = cross-entropy + the target's logit, so the z-loss needs no fp32 logits either;
    # its gradient reaches the logits through both terms (softmax - onehot, then + onehot).
    log_sum_exp = rows + logits.gather(-1, targets[:, None]).squeeze(-1).float()
    z = log_sum_exp.pow(2).mean()
    return loss + z_loss_coef * z, loss, z
