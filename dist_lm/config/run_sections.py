"""The config sections of how a run executes: parallelism and precision, checkpoints, logging,
naming. (What is trained: :mod:`dist_lm.config.schema`, which gathers all sections into Config.)
Frozen, typed, a docstring per field, as there."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dist_lm.config.errors import require

MAX_MINUTES = 1e6  # about two years: a duration past it overflows Python's timedelta


@dataclass(frozen=True)
class ParallelConfig:
    """How DeepSpeed runs the model: ZeRO stage, precision, memory savers."""

    zero_stage: Literal[0, 1, 2, 3] = 1
    """ZeRO stage: 0 data parallel, 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    precision: Literal["auto", "bf16", "bf16-autocast", "fp16", "fp32", "fp8"] = "auto"
    """auto: bf16 on GPUs that support it, fp16 with dynamic loss scaling on older GPUs, fp32 on CPU.
    bf16: bf16 weights, fp32 master weights in DeepSpeed's optimizer. bf16-autocast (ZeRO-0 only):
    fp32 weights, the matrix products in bf16 under torch.autocast, torch's fused AdamW stepped
    directly, as plain PyTorch trains; faster than bf16 on one GPU (docs/benchmarks.md).
    fp8: bf16, with the blocks' linear layers multiplying in float8 through torchao (pip install
    torchao); needs a GPU of compute capability 8.9 or more (Ada, Hopper) and parallel.compile=true.
    The embeddings and the output head stay in bf16."""
    fp8_recipe: Literal["tensorwise", "rowwise"] = "tensorwise"
    """With precision=fp8: torchao's scaling recipe, one scale per tensor (tensorwise, the faster)
    or per row (rowwise, finer against outliers)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them."""
    offload_optimizer: bool = False
    """Keep optimizer state on the CPU and step it with DeepSpeed's CPU Adam (ZeRO 1-3)."""
    offload_params: bool = False
    """Keep parameters on the CPU between uses (ZeRO 3 only)."""
    overlap_comm: bool = True
    """Overlap gradient reduction with backward (ZeRO 1-3)."""
    reduce_bucket_size: int = 500_000_000
    """Elements per gradient-reduction bucket."""
    allgather_bucket_size: int = 500_000_000
    """Elements per parameter all-gather bucket (ZeRO 1-2)."""
    zero_hpz_partition_size: int = 1
    """ZeRO++ hpZ (ZeRO-3 only): a second copy of the weights, partitioned over groups of this
    many ranks (a node's GPUs), which backward's all-gathers read, so that they stay inside a
    node instead of crossing the link between nodes; each rank holds 1/this of the weights more.
    1: off. Must divide the rank count (docs/parallelism.md, "Across nodes: ZeRO++")."""
    zero_quantized_weights: bool = False
    """ZeRO++ qwZ (ZeRO-3 only): the weight all-gathers sent as int8 blocks, half bf16's bytes.
    DeepSpeed's quantizer is CUDA code: GPU runs only."""
    zero_quantized_gradients: bool = False
    """ZeRO++ qgZ (ZeRO-3 only): gradients reduce-scattered as int4 blocks, hierarchically within
    and then across nodes. DeepSpeed's quantizer is CUDA code: GPU runs only."""
    compile: bool = False
    """torch.compile the model inside the DeepSpeed engine (engine.compile()); on a GPU only, a
    CPU run ignores it. The first step waits for compilation (minutes at 1B parameters)."""
    compile_regions: bool = False
    """With compile at ZeRO 0-2: compile each block (one graph shared by all of them) and the
    output, instead of the whole model. The first step comes sooner (47 s at 1.3B on an H200, about
    half the whole model's), the steps are slower (4% at 1.3B with micro-batch 8, 0.7% at 1.1B with
    32, a quarter at 124M: docs/benchmarks.md). --config auto sets it for short runs (docs/planner.md)."""
    deepcompile: bool = False
    """With compile at ZeRO-3: DeepSpeed's DeepCompile, which puts ZeRO-3's parameter gathers and
    releases into the compiled graph; torch.compile alone breaks the graph at each of DeepSpeed's
    hooks (docs/benchmarks.md has what each gives). The first step waits for it to compile and
    profile, and a step a few later again for its prefetching. Ignored without compile or below
    ZeRO-3, where plain torch.compile is the fast path."""
    timeout_minutes: float = 30.0
    """The longest a rank may go without finishing a step or an evaluation batch (the first,
    compiling, step included): then it ends with one line naming the rank that stopped answering,
    exit status 3. Every collective's timeout too (plus a minute)."""
    expert_parallel_size: int = 1
    """Ranks the experts of a moe layer are spread over (must divide the rank count and
    model.n_experts); DeepSpeed's MoE layer does the all-to-all."""
    sequence_parallel_size: int = 1
    """Ranks that split each window's tokens between them (DeepSpeed's Ulysses): every block runs
    on its rank's share of the sequence, and attention trades the sequence for the heads with an
    all-to-all, so activations per rank shrink by this factor. Must divide the rank count,
    model.n_heads, model.kv_heads and model.seq_len; the data-parallel size is the rank count
    over it (docs/parallelism.md)."""
    tiled_mlp: bool = False
    """DeepSpeed's TiledMLP (from ALST): each block's MLP runs on tiles of the sequence (about
    d_model tokens each) and is recomputed tile by tile in backward, so its wide intermediate
    (gate, up and their product) is never kept for a whole window: the next memory wall at long
    context after attention. Costs one more MLP forward per step; eager only (not with
    parallel.compile). docs/parallelism.md."""
    tensor_parallel_size: int = 1
    """Ranks that split each block's linear layers between them (DeepSpeed's AutoTP): the query,
    key, value, gate and up projections by their outputs, the attention output and down
    projections by their inputs, so weights, gradients and optimizer state per rank shrink by
    this factor. Must divide the rank count, model.n_heads, model.kv_heads and the MLP's width;
    not with sequence_parallel_size above 1, fp8 or DeepCompile (docs/parallelism.md)."""

    @property
    def uses_deepcompile(self) -> bool:
        # A preset may turn DeepCompile on and a user lower the ZeRO stage or turn compile off:
        # that is a plain torch.compile (or eager) run, not a config error.
        return self.deepcompile and self.compile and self.zero_stage == 3

    def __post_init__(self) -> None:
        require(
            not self.offload_optimizer or self.zero_stage >= 1,
            "offload_optimizer",
            "needs parallel.zero_stage 1, 2 or 3",
        )
        require(not self.offload_params or self.zero_stage == 3, "offload_params", "needs parallel.zero_stage=3")
        require(self.reduce_bucket_size > 0, "reduce_bucket_size", "must be positive")
        require(self.allgather_bucket_size > 0, "allgather_bucket_size", "must be positive")
        require(
            0 < self.timeout_minutes <= MAX_MINUTES, "timeout_minutes", f"must be positive and at most {MAX_MINUTES:g}"
        )
        require(self.expert_parallel_size > 0, "expert_parallel_size", "must be positive")
        require(self.sequence_parallel_size > 0, "sequence_parallel_size", "must be positive")
        require(self.tensor_parallel_size > 0, "tensor_parallel_size", "must be positive")
        require(self.zero_hpz_partition_size > 0, "zero_hpz_partition_size", "must be positive")
        for key, on in (
            ("zero_hpz_partition_size", self.zero_hpz_partition_size > 1),
            ("zero_quantized_weights", self.zero_quantized_weights),
            ("zero_quantized_gradients", self.zero_quantized_gradients),
        ):
            require(
                not on or self.zero_stage == 3, key, "is ZeRO++, which partitions weights: needs parallel.zero_stage=3"
            )
        require(
            not (self.tiled_mlp and self.compile),
            "tiled_mlp",
            "runs eager: DeepSpeed's TiledMLP is not tested under torch.compile; set parallel.compile=false",
        )
        require(
            self.precision != "bf16-autocast" or self.zero_stage == 0,
            "precision",
            "bf16-autocast keeps whole fp32 weights and steps torch's optimizer itself, which is "
            "ZeRO-0's path; set parallel.zero_stage=0, or use precision=bf16 with ZeRO 1-3",
        )
        require(
            self.precision != "fp8" or self.compile,
            "precision",
            "fp8 needs parallel.compile=true (torchao's float8 casts are fast only compiled); set it",
        )


@dataclass(frozen=True)
class CheckpointConfig:
    """When checkpoints are written, where, how many are kept, and what a run resumes from."""

    interval: int = 500
    """Save every this many steps (and always at the end); 0 saves only at the end."""
    dir: str | None = None
    """Where checkpoints go. null: checkpoints/ in the run directory."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint of this run, if there is one. none:
    start afresh (existing checkpoints are kept until newer ones replace them). A path: that
    checkpoint directory (.../checkpoints/stepNNNNNNNN) or the newest of that run directory.
    Also --resume on the command line."""
    keep_last: int = 3
    """Keep the newest this many complete checkpoints; 0 keeps all."""
    keep_best: bool = True
    """Also keep the checkpoint with the lowest validation loss."""
    allow_data_change: bool = False
    """Resume even though the data differs from the checkpoint's (meta.json, shard sizes or
    tokenizer); the data order continues by sample count. Also --allow-data-change."""
    save_timeout_minutes: float = 30.0
    """A save not finished in this time ends the process with one line (status 3) instead of
    hanging; the previous checkpoint stays the latest."""
    async_save: bool | Literal["auto"] = "auto"
    """Hold training only while a save copies the state to host memory; a thread per rank writes
    the files while training goes on, and the checkpoint is complete (``latest`` moves) once every
    rank's files are on disk. Costs host memory for a copy of each rank's share, kept for the run.
    auto: on for a run on GPUs (at 1.13B on one H100 a save held training 0.41 s, the first one
    5.17 s, instead of 28.9 s), off on CPU, where the copy costs as much as the write
    (docs/benchmarks.md, Save stall)."""
    save_at_end: bool = True
    """Save when the run ends at train.max_steps or by early stopping. false for throwaway runs
    (dist-lm find-batch's probes); a stop by signal, train.stop_at_step or
    train.time_limit_minutes still saves, so that the run can continue."""

    def saves_async(self, on_gpu: bool) -> bool:
        """Whether a run on a GPU (``on_gpu``) or on the CPU saves with async_save."""
        return on_gpu if self.async_save == "auto" else self.async_save

    def __post_init__(self) -> None:
        require(self.interval >= 0, "interval", "must be >= 0 (0 saves only at the end)")
        require(bool(self.resume), "resume", "must be auto, none, or a checkpoint path")
        require(self.keep_last >= 0, "keep_last", "must be >= 0 (0 keeps all)")
        require(
            0 < self.save_timeout_minutes <= MAX_MINUTES,
            "save_timeout_minutes",
            f"must be positive and at most {MAX_MINUTES:g}",
        )

    def root(self, run_dir: Path) -> Path:
        """Where the run's checkpoints are: checkpoint.dir, or checkpoints/ in ``run_dir``."""
        return Path(self.dir) if self.dir else run_dir / "checkpoints"


@dataclass(frozen=True)
class LoggingConfig:
    """Where metrics go besides metrics.jsonl and metrics.csv (always written)."""

    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    """Weights & Biases, on rank 0. auto: online when an API key is configured (WANDB_API_KEY or
    `wandb login`) and wandb starts online within WANDB_INIT_TIMEOUT (30 s), else offline (files
    in the run directory, uploaded later with `wandb sync`). online: fail if it cannot."""
    wandb_project: str = "dist-lm"
    """wandb project."""
    wandb_entity: str | None = None
    """wandb entity (user or team). null: your default entity."""
    wandb_group: str | None = None
    """wandb group, e.g. one per sweep."""
    wandb_tags: list[str] = field(default_factory=list)
    """wandb tags; on the command line: logging.wandb_tags=a,b."""
    tensorboard: bool = False
    """Also write TensorBoard event files to tensorboard/ in the run directory (needs the
    tensorboard package)."""
    progress: bool = True
    """A progress bar on rank 0 (steps, ETA, loss, tokens/s, MFU) when stderr is a terminal."""
    profile_start: int = 0
    """Profile the optimizer steps from this one (0: no profiling) with torch.profiler: each
    rank writes a Chrome trace and a table of its costliest operations to profile/ in the run
    directory, and the log says how busy the GPU was."""
    profile_steps: int = 3
    """How many steps to profile from logging.profile_start."""

    def __post_init__(self) -> None:
        require(self.profile_start >= 0, "profile_start", "must be 0 (off) or the first step to profile")
        require(self.profile_steps >= 1, "profile_steps", "must be at least 1")


@dataclass(frozen=True)
class RunConfig:
    """Naming and placing the run."""

    name: str | None = None
    """Run name. null: a new run, named after the config, the start time and six random hex digits
    (debug-20261123-014500-3fa2c1); the lines that end a run early name it, and the same command with
    run.name=<that name> continues the run."""
    dir: str | None = None
    """Run directory (resolved config, log, metrics.jsonl, checkpoints). null: runs/<name>."""
    verbose: bool = False
    """Show DeepSpeed's own start-up output (quiet by default)."""

    def dir_for(self, name: str) -> Path:
        """The run directory: run.dir, or runs/<name> (``name``: run.name, or the one made for it)."""
        return Path(self.dir) if self.dir else Path("runs") / name

    def __post_init__(self) -> None:
        if self.name is not None:
            problem = name_problem(self.name)
            require(problem is None, "name", f"{problem} (use run.dir for a path)")
        require(
            self.dir is None or (self.dir.strip() and "\0" not in self.dir),
            "dir",
            "must be a path, or null for runs/<run.name>",
        )


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a run directory under runs/, or None. A name is one directory:
    not '.' or '..' (the current or the parent directory: a run would write into the user's own
    files), not hidden (runs/.compile-cache sits beside the runs), no '/', no control characters,
    no spaces at either end, and at most 200 characters."""
    if not name:
        return "must not be empty"
    if name.startswith("."):
        return f"{name!r} starts with '.': it would be the current or parent directory, or a hidden one"
    if "/" in name or "\\" in name:
        return f"{name!r} holds a path separator"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return f"{name!r} holds a control character"
    if name != name.strip():
        return f"{name!r} starts or ends with a space"
    if len(name.encode()) > 200:
        return f"is {len(name.encode())} bytes long, more than 200"
    return None
