"""The configuration schema: typed dataclasses, one per section, a docstring per field.

These classes, with :mod:`dist_lm.config.model_section` (the model) and
:mod:`dist_lm.config.run_sections` (how a run executes), are the only schema.
They are frozen: what is resolved later (the vocabulary from the data, the run's name) makes a new
config with :func:`replaced`, which validates again. Presets and dotted overrides are mapped onto
them by :mod:`dist_lm.config.io`, which checks types; range and consistency checks live here, in
``__post_init__``, and raise :class:`ConfigError` naming the field and the fix, in one line."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dist_lm.config.errors import MAX_INT, ConfigError, UserError, require
from dist_lm.config.model_section import ModelConfig
from dist_lm.config.run_sections import MAX_MINUTES, CheckpointConfig, LoggingConfig, ParallelConfig, RunConfig

MAX_SEED = MAX_INT  # torch's generators take any seed in [0, 2**64); the sampler hashes it mod 2**64

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "MixtureSource",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "UserError",
    "MAX_SEED",
    "replaced",
]


@dataclass(frozen=True)
class MixtureSource:
    """One dataset of a mixture (data.mixture)."""

    dir: str
    """A directory of token shards with a meta.json (made by dist-lm prepare)."""
    weight: float
    """Its share of the training samples; the weights are normalised to sum to 1."""
    name: str | None = None
    """Its name in the metrics (val_loss_NAME). null: the directory's own name."""

    def __post_init__(self) -> None:
        require(bool(self.dir), "dir", "must name a dataset directory")
        require(math.isfinite(self.weight) and self.weight > 0, "weight", "must be a positive, finite number")
        require(
            self.name is None or (self.name and self.name.replace("-", "_").isidentifier()),
            "name",
            "must be a name of letters, digits, _ and - (it becomes a metric's name)",
        )

    @property
    def label(self) -> str:
        return self.name or Path(self.dir).name


@dataclass(frozen=True)
class DataConfig:
    """Where the training tokens come from."""

    dir: str | None = None
    """Directory of token shards with a meta.json. null: the embedded corpus (Python's own
    documentation), tokenized once into the cache directory on first use."""
    cache_dir: str | None = None
    """Where the embedded corpus is prepared. null: $DIST_LM_CACHE, else ~/.cache/dist_lm."""
    embedded_vocab_size: int = 4096
    """Vocabulary size of the BPE tokenizer trained for the embedded corpus."""
    dtype: Literal["auto", "uint16", "uint32"] = "auto"
    """Token type of the shards. auto: from meta.json. nanoGPT's train.bin/val.bin (no meta.json)
    need it given: uint16 for GPT-2 tokens."""
    log_samples: bool = False
    """Each rank appends the window ids it reads, a line "STEP: IDS" per step, to samples/rank<N>.txt
    in the run directory: an audit trail of exactly what every rank trained on. A resumed run
    first drops the lines of the steps it trains again. (In a mixture, an id is window x
    sources + source.)"""
    document_mask: bool = False
    """Document-aware packing: in a window packed with several documents, each token attends
    only to its own document and positions restart at each one (end-of-text closes a
    document). FlexAttention's block masks on GPUs. Off by default (its cost: docs/benchmarks.md);
    not with model.dropout or model.position=bias."""
    mixture: list[MixtureSource] = field(default_factory=list)
    """Train on several prepared datasets at once, instead of data.dir: a list of {dir, weight}
    (and an optional name), e.g. on the command line data.mixture='[{dir: A, weight: 0.7}, {dir:
    B, weight: 0.3}]'. They must share one tokenizer. Each sample comes from one source, in
    proportion to the weights over any stretch of samples; the order does not depend on the rank
    count and resumes exactly. Validation reports each source's loss and their weighted mean.
    Weights may change on resume (docs/data.md)."""

    verify: Literal["auto", "full", "sampled", "none"] = "auto"
    """Check the shards' content against the hashes dist-lm prepare recorded in meta.json when a
    run starts or resumes (a shard rewritten in place or damaged is refused, not trained on).
    full: every byte (about 5 GB/s per rank; ranks share the shards). sampled: 4 MiB of each
    shard. auto: full up to 16 GiB of shards, sampled above. none: sizes only. At every checkpoint
    the shards are also checked for a change on disk since the start (docs/data.md)."""

    def __post_init__(self) -> None:
        require(self.embedded_vocab_size >= 512, "embedded_vocab_size", "must be at least 512")
        require(not (self.dir and self.mixture), "mixture", "replaces data.dir: set one of them, not both")
        labels = [m.label for m in self.mixture]
        require(
            len(set(labels)) == len(labels),
            "mixture",
            f"names its sources twice ({labels}); give each a name: [{{dir: ..., weight: ..., name: ...}}, ...]",
        )


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer (AdamW, or Muon for hidden matrices) and the learning-rate schedule."""

    name: Literal["adamw", "muon"] = "adamw"
    """adamw everywhere; or muon (DeepSpeed's Muon) for the blocks' weight matrices, with AdamW
    for the embeddings, the output head, norms and biases."""
    muon_lr: float = 0.02
    """Peak learning rate of the Muon matrices (the schedule scales it like lr)."""
    muon_momentum: float = 0.95
    """Muon's momentum."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of decay (and the floor of cosine restarts)."""
    min_lr_ratio: float | None = None
    """If set, min_lr is lr x this ratio, and min_lr is ignored (handy for sweeping lr)."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not norms or biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    schedule: Literal["cosine", "cosine_restarts", "wsd", "constant"] = "cosine"
    """cosine: warmup then cosine to min_lr at train.max_steps. cosine_restarts: warmup, then
    cosine cycles of restart_period steps. wsd: warmup, constant, then linear decay to min_lr over
    the last decay_fraction of the steps. constant: warmup then constant."""
    warmup_steps: int = 100
    """Linear warmup from 0 to lr over this many steps."""
    restart_period: int = 1000
    """Length in steps of one cosine cycle, for schedule=cosine_restarts."""
    decay_fraction: float = 0.2
    """Fraction of train.max_steps spent decaying, for schedule=wsd."""
    z_loss: float = 0.0
    """Weight of the z-loss (PaLM, OLMo): z_loss x mean(logsumexp(logits)^2) is added to the
    training loss, keeping the log-partition function near 0; logged apart as z_loss (the logged
    loss stays the cross-entropy). 1e-4 is the usual value; 0 turns it off."""

    def __post_init__(self) -> None:
        require(self.lr > 0, "lr", "must be positive")
        require(self.muon_lr > 0, "muon_lr", "must be positive")
        require(0 <= self.muon_momentum < 1, "muon_momentum", "must be in [0, 1)")
        if self.min_lr_ratio is not None:
            require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1] or null")
            # Derived while the section is built; a config never changes once it validated.
            object.__setattr__(self, "min_lr", self.lr * self.min_lr_ratio)
        require(0 <= self.min_lr <= self.lr, "min_lr", f"must be between 0 and lr={self.lr}")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(0 <= self.beta1 < 1, "beta1", "must be in [0, 1)")
        require(0 <= self.beta2 < 1, "beta2", "must be in [0, 1)")
        require(self.eps > 0, "eps", "must be positive")
        require(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(self.restart_period > 0, "restart_period", "must be positive")
        require(0 < self.decay_fraction <= 1, "decay_fraction", "must be in (0, 1]")
        require(self.z_loss >= 0, "z_loss", "must be >= 0 (0 turns it off)")


@dataclass(frozen=True)
class TrainConfig:
    """The training loop: length, batch, cadences."""

    seed: int = 1337
    """Seeds model initialisation, data order and sampling."""
    max_steps: int = 1000
    """Optimizer steps to train for; the learning-rate schedule spans them."""
    max_tokens: int | None = None
    """Stop earlier once this many training tokens have been consumed. null: no token budget."""
    micro_batch_size: int = 8
    """Sequences per rank per forward/backward pass."""
    global_batch_size: int | None = None
    """Sequences per optimizer step across all ranks; must be a multiple of micro_batch_size x
    data-parallel ranks (the rest is gradient accumulation). null: micro_batch_size x ranks."""
    log_interval: int = 10
    """Log training metrics every this many steps (also the loss all-reduce cadence)."""
    eval_interval: int = 100
    """Evaluate validation loss every this many steps (and at the end); 0 disables."""
    eval_samples: int = 64
    """Validation windows evaluated each time: a fixed set, the same for every rank count."""
    sample_tokens: int = 0
    """At the end of training, print a sample of this many generated tokens; 0 disables."""
    sample_prompt: str = "The"
    """Prompt of that sample."""
    sample_at_eval: bool = False
    """Also print such a sample after every evaluation."""
    stop_at_step: int | None = None
    """End this process cleanly, with a checkpoint, after this step; the learning-rate schedule
    still spans max_steps, and the same run.name or run.dir started again continues it. 0: a
    checkpoint of the weights the run starts from (model.init_from's), before any step."""
    time_limit_minutes: float | None = None
    """End this process cleanly, with a checkpoint, before this many minutes have passed (for
    a run split across job allocations). It keeps room for twice a typical recent step (the
    median of the last 10, so the compiling steps do not count), twice the last save, and the
    next evaluation if the next step has one."""
    early_stop_patience: int = 0
    """Stop once this many evaluations in a row have not improved the best validation loss by
    early_stop_min_delta; 0 disables early stopping."""
    early_stop_min_delta: float = 0.0
    """The improvement in validation loss that counts, for early stopping."""
    check_finite: bool = False
    """After every backward, check gradients and loss for NaN/inf and name the first offending
    tensor (debug mode turns this on; it costs a host-device sync per parameter)."""
    max_skipped_steps: int = 10
    """An update whose gradients hold NaN or inf is skipped and logged; after this many in a row
    the run stops (exit status 1) with its last good checkpoint intact. 0: never stop."""
    spike_factor: float = 0.0
    """Loss-spike guard: a micro-batch whose loss (averaged over ranks) is above this factor x
    the running mean of the last 50 is logged with its global sample ids (also to spikes.jsonl
    in the run directory). 0 disables it; on, it costs a host-device sync per micro-batch."""
    spike_skip: bool = False
    """With the spike guard on, also drop the spiking micro-batch's gradient."""

    def __post_init__(self) -> None:
        require(0 <= self.seed <= MAX_SEED, "seed", f"must be between 0 and 2**53 (got {self.seed})")
        require(self.max_steps > 0, "max_steps", "must be positive")
        require(self.max_tokens is None or self.max_tokens > 0, "max_tokens", "must be positive or null")
        require(self.micro_batch_size > 0, "micro_batch_size", "must be positive")
        require(
            self.global_batch_size is None or self.global_batch_size > 0,
            "global_batch_size",
            "must be positive or null",
        )
        require(self.log_interval > 0, "log_interval", "must be positive")
        require(self.eval_interval >= 0, "eval_interval", "must be >= 0 (0 disables evaluation)")
        require(self.eval_samples > 0, "eval_samples", "must be positive")
        require(self.sample_tokens >= 0, "sample_tokens", "must be >= 0")
        require(self.stop_at_step is None or self.stop_at_step >= 0, "stop_at_step", "must be at least 0, or null")
        require(
            self.time_limit_minutes is None or 0 < self.time_limit_minutes <= MAX_MINUTES,
            "time_limit_minutes",
            f"must be positive and at most {MAX_MINUTES:g}, or null",
        )
        require(self.early_stop_patience >= 0, "early_stop_patience", "must be >= 0 (0 disables)")
        require(self.early_stop_min_delta >= 0, "early_stop_min_delta", "must be >= 0")
        require(self.max_skipped_steps >= 0, "max_skipped_steps", "must be >= 0 (0: never stop)")
        require(self.spike_factor == 0 or self.spike_factor > 1, "spike_factor", "must be 0 (off) or above 1")


@dataclass(frozen=True)
class Config:
    """The whole configuration of a run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    preset: str = "custom"
    """Name of the preset the config was loaded from (set by the loader)."""

    def __post_init__(self) -> None:
        if self.data.document_mask:
            require(
                self.model.position != "bias",
                "data.document_mask",
                "does not combine with model.position=bias (its bias is the attention mask); use rope",
            )
            require(
                not self.model.dropout,
                "data.document_mask",
                "does not combine with model.dropout (FlexAttention has no attention dropout); set one of them",
            )


def replaced(cfg: Config, section: str, **changes) -> Config:
    """``cfg`` with fields of one section changed, e.g. ``replaced(cfg, "model", vocab_size=512)``:
    a new config, validated again; ``cfg`` itself never changes."""
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})
