"""Building a run: every check, the process group, the run directory, the engine and the resume,
into one :class:`Session` that the loop (:mod:`dist_lm.train.loop`) runs.

Everything that can be wrong with the user's input (config, data, launch environment) is
checked before the process group starts, so a bad run fails with one line and nothing is
written into a run directory before that. The launcher checks the data even earlier, before
torch is imported (:mod:`dist_lm.data.checks`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable

import torch

from dist_lm.config.batch import BatchSizes, batch_sizes
from dist_lm.config.io import to_dict
from dist_lm.config.layout import ParallelLayout, parallel_layout
from dist_lm.config.schema import Config, UserError
from dist_lm.data import integrity
from dist_lm.data.checks import ResolvedData, Source, resolve_data
from dist_lm.data.sampler import TrainData, ValData
from dist_lm.model.counts import count_parameters, flops_per_token
from dist_lm.model.loss import uses_chunked
from dist_lm.model.moe import build_model, check_moe
from dist_lm.observe import log, metrics, sinks
from dist_lm.observe.profiling import StepProfiler
from dist_lm.plan import memory
from dist_lm.runtime import distributed, ds_config, engine, fp8, hardware, launch, op_builds
from dist_lm.runtime.launch import DistEnv
from dist_lm.runtime.precision import Precision
from dist_lm.store import checkpoints, hugging_face
from dist_lm.store.state import RunState
from dist_lm.train import checkpoint, restore, run_directory, watchdog
from dist_lm.train.preemption import StopControl

# A first checkpoint's size per parameter, before one was written to measure: the optimizer's
# fp32 master and two Adam moments (12), the module in bf16 (2; 4 in fp32) and the weights file (4).
CHECKPOINT_BYTES_PER_PARAMETER = 18
COMPILE_CACHE = ".compile-cache"  # beside the run directories: torch.compile's kernels, for every run there


@dataclass
class Session:
    """A run, built and checked: what the loop needs and nothing it must decide."""

    cfg: Config
    """Resolved: model.vocab_size from the data, run.name and run.dir as rank 0 chose them."""
    dist_env: DistEnv
    layout: ParallelLayout
    """Which ranks share data and which split a sequence; where this rank sits."""
    device: torch.device
    precision: Precision
    batch: BatchSizes
    data: ResolvedData
    train_data: TrainData
    val_sets: list[tuple[Source, ValData]]
    """Each source's validation windows (one source outside a mixture)."""
    watchdog: watchdog.Watchdog
    stop: StopControl
    run_dir: Path
    ckpt_root: Path
    model_engine: Any  # deepspeed.DeepSpeedEngine
    metrics: metrics.MetricsWriter
    profiler: StepProfiler
    sample_log: sinks.SampleLog | None
    summary: metrics.RunSummary
    start_time: float
    resumed: RunState | None
    """The state of the checkpoint the engine was loaded from (None: a fresh run)."""
    dir_locks: list[IO[str]]  # held by rank 0 from the run directory's first write
    data_stamps: dict
    """This rank's share of the shards as they were checked (dist_lm.data.integrity.stamps)."""

    def close(self) -> None:
        self.train_data.close()
        if self.sample_log is not None:
            self.sample_log.close()
        self.metrics.close()
        log.set_log_file(None)
        for held in self.dir_locks:
            held.close()  # the directories are free for the next process


def start(cfg: Config, plan_summary: list[str] = (), data: ResolvedData | None = None) -> Session:
    """Check, start and load everything for ``cfg``. ``plan_summary``: the lines of the --config
    auto plan that produced cfg, for the log. ``data``: what ``resolve_data(cfg)`` returned, when
    the caller checked the data already. In stages: the checks that need no process group (a
    bad input fails there, before anything starts), the data readers, the process group and
    the run directory with the checkpoint to resume, the log's opening lines, the engine."""
    start_time = time.perf_counter()
    inputs = _checked_inputs(cfg, data)
    cfg, data, layout, batch = inputs.cfg, inputs.data, inputs.layout, inputs.batch
    train_data, val_sets = _data_readers(cfg, data, layout, batch, inputs.device)
    op_builds.clear_left_locks()  # before any rank can load an op: a lock a dead process left would hang it
    port = distributed.init_process_group(inputs.dist_env, inputs.device, cfg.parallel.timeout_minutes)
    # Heartbeats from here; the deadline is armed when training starts (Trainer.fit).
    dog = watchdog.start(
        layout.rank, layout.world_size, inputs.dist_env.master_addr, port, 60 * cfg.parallel.timeout_minutes
    )
    data_stamps, data_checked = _check_data_content(cfg.data.verify, data, layout.rank, layout.world_size)
    # From here on SIGTERM/SIGUSR1 end the run with a checkpoint (engine set-up included).
    stop = StopControl(cfg.train.stop_at_step, cfg.train.time_limit_minutes, start_time)
    given, cfg = cfg, run_directory.with_run_dir(cfg)
    dog.how_to_continue = stop.how_to_continue = run_directory.how_to_continue(given, cfg)
    run_dir = Path(cfg.run.dir)
    place = _checkpoint_to_resume(cfg, data, run_dir, inputs.precision, layout)
    found = place.found
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.parallel)
    # Before the run directory: damaged weights or other logits are bad input, refused with nothing written.
    started_from = (
        _start_from_hugging_face(model, Path(cfg.model.init_from), layout.rank)
        if cfg.model.init_from and found is None  # a resumed run continues from its own checkpoint
        else []
    )
    dir_locks = run_directory.take_run_dirs(cfg, run_dir, place.root if place.shared_root else None)
    log.set_log_file(run_dir / "train.log")
    _log_opening(cfg, inputs, plan_summary, run_dir, val_sets, data_checked)

    # --- model and engine
    parameters = count_parameters(cfg.model)["total"]
    log.info(f"model {parameters / 1e6:.2f}M parameters, {flops_per_token(cfg.model) / 1e6:.1f} MFLOP/token")
    for log_line, line in started_from:
        log_line(line)
    if inputs.precision is Precision.FP8:
        log.info(
            f"fp8: {len(fp8.converted_layers(model))} linear layers of the blocks multiply in float8 (torchao, "
            f"{cfg.parallel.fp8_recipe} scaling), the embeddings and the output head in bf16; MFU is against "
            "the GPU's bf16 peak"
        )
    predicted = None
    if inputs.device.type == "cuda":
        predicted = memory.estimate(
            cfg.model,
            cfg.parallel,
            inputs.precision,
            batch.micro_batch_size,
            layout,
            z_loss=cfg.optim.z_loss > 0,
        )
        log.info(f"predicted peak GPU memory per rank {predicted.describe()}")
    engine.quiet(cfg.run.verbose)
    if building := op_builds.ops_to_build(inputs.device, cfg.parallel):
        log.info(
            f"building DeepSpeed's {' and '.join(building)} op for this machine (its first use: about a minute "
            "on 2 cores, then cached for every run)"
        )
    engine.load_ops(inputs.device, cfg.parallel)
    if place.universal:  # saved on another world size or ZeRO stage: DeepSpeed's universal format
        restore.convert_to_universal(found.path, layout.rank, distributed.barrier)
    start_step = found.state.step if found else 0
    summary = metrics.RunSummary(
        launcher=inputs.dist_env.launcher,
        world_size=layout.world_size,
        precision=inputs.precision,
        zero_stage=cfg.parallel.zero_stage,
        global_batch_size=batch.global_batch_size,
        micro_batch_size=batch.micro_batch_size,
        grad_accum_steps=batch.grad_accum_steps,
        parameters=parameters,
        flops_per_token=flops_per_token(cfg.model),
        predicted_peak_mem_gb=predicted.total / memory.GB if predicted else None,
        start_step=start_step,
        sequence_parallel_size=layout.sequence_parallel_size,
        tensor_parallel_size=layout.tensor_parallel_size,
        init_from=cfg.model.init_from,
    )
    summary.write(run_dir)
    model_engine = engine.initialize(
        model,
        cfg.parallel,
        cfg.optim,
        batch,
        inputs.precision,
        inputs.device,
        layout,
        load_universal=place.universal,
        start_step=start_step,
        verbose=cfg.run.verbose,
    )
    if zero_plus_plus := engine.zero_plus_plus(model_engine):
        log.info(f"ZeRO++: {zero_plus_plus}")
    # Lines past start_step in the run directory's logs were written by an earlier process.
    problem = None
    try:  # rank 0's sinks; wandb=online that cannot start is a UserError there, and so on every rank
        per_source = [f"val_loss_{s.name}" for s in data.sources] if len(data.sources) > 1 else []
        writer = metrics.MetricsWriter(run_dir, cfg.logging, cfg.run.name, to_dict(cfg), start_step, per_source)
    except UserError as e:
        problem = str(e)
    problem = distributed.from_rank0(problem)
    if problem:
        raise UserError(problem)
    profiler = StepProfiler(
        cfg.logging.profile_start, cfg.logging.profile_steps, run_dir / "profile", f"rank{layout.rank}", inputs.device
    )
    sample_log = sinks.SampleLog(run_dir, layout.rank, layout.world_size, start_step) if cfg.data.log_samples else None
    if found is not None:
        restore.resume(model_engine, train_data, found, place.universal, cfg, layout.rank)
    return Session(
        cfg,
        inputs.dist_env,
        layout,
        inputs.device,
        inputs.precision,
        batch,
        data,
        train_data,
        val_sets,
        dog,
        stop,
        run_dir,
        place.root,
        model_engine,
        writer,
        profiler,
        sample_log,
        summary,
        start_time,
        found.state if found else None,
        dir_locks,
        data_stamps,
    )


def _start_from_hugging_face(model: torch.nn.Module, directory: Path, rank: int) -> list[tuple[Callable, str]]:
    """A fresh continued run: the model.init_from weights into the whole model on every rank,
    before the engine partitions it (the model is built whole at every ZeRO stage, so a plain
    load is DeepSpeed's way in too), then rank 0 holds our forward to the reference logits. A
    collective; a problem anywhere is one UserError on every rank. Returns what to log, for
    when the log is open."""
    problem, dtype = None, None
    try:
        dtype = hugging_face.load_into(model, directory)
    except UserError as e:
        problem = str(e)
    problem = distributed.first_problem(problem)
    checked = ""
    if problem is None and rank == 0:
        try:
            with torch.random.fork_rng(devices=[]):  # (transformers draws while it builds its model: rank 0 alone)
                checked = hugging_face.check_logits(model, directory)
        except UserError as e:
            problem = str(e)
    problem = distributed.from_rank0(problem)
    if problem:
        raise UserError(problem)
    stored = str(dtype).removeprefix("torch.")
    lines = [(log.info, f"model.init_from: started from the weights of {directory} (stored in {stored})")]
    if checked:
        lines.append((log.info, checked))
    elif checked is None:
        not_checked = f"transformers is not installed and {directory} has no {hugging_face.REFERENCE_LOGITS}"
        lines.append((log.warn, f"model.init_from: logits not checked: {not_checked}"))
    return lines


@dataclass(frozen=True)
class _Inputs:
    """What the checks before the process group resolved."""

    cfg: Config
    data: ResolvedData
    dist_env: DistEnv
    layout: ParallelLayout
    batch: BatchSizes
    device: torch.device
    precision: Precision
    precision_reason: str
    memory_cap: str | None
    bound_cores: list[int]


def _checked_inputs(cfg: Config, data: ResolvedData | None) -> _Inputs:
    """Every check that needs no process group: the launch, the device, the layout and the batch,
    the data. A bad input fails here with one line, before anything starts or is written."""
    dist_env = launch.detect(os.environ)
    launch.check_topology(cfg.parallel, dist_env)
    launch.check_master_reachable(dist_env)
    device = distributed.device_for(dist_env)
    memory_cap = hardware.apply_gpu_memory_cap(device)
    bound_cores: list[int] = []
    if cfg.parallel.offload_optimizer:
        op_builds.check_cpu_adam()
        bound_cores = hardware.bind_cores(dist_env.local_rank, dist_env.local_world_size)
    precision, precision_reason = Precision.resolve(cfg.parallel.precision, device)
    ds_config.check_device_options(cfg.parallel, device.type)
    layout = parallel_layout(cfg.parallel, cfg.model, dist_env.world_size, dist_env.rank)
    batch = batch_sizes(cfg.train, layout.dp_size)
    check_moe(cfg.model, cfg.parallel, dist_env.world_size)
    data = data or resolve_data(cfg)
    if data.config.logging.tensorboard:
        sinks.require_tensorboard()
    return _Inputs(
        data.config, data, dist_env, layout, batch, device, precision, precision_reason, memory_cap, bound_cores
    )


def _data_readers(
    cfg: Config, data: ResolvedData, layout: ParallelLayout, batch: BatchSizes, device: torch.device
) -> tuple[TrainData, list[tuple[Source, ValData]]]:
    """The training windows and each source's validation windows of this rank's data-parallel
    share: the ranks that split a sequence read the same windows."""
    eot_id = data.meta.get("eot_id") if cfg.data.document_mask else None
    train_data = TrainData.mixture(
        [(s.dir, s.meta, s.weight) for s in data.sources],
        cfg.model.seq_len,
        batch,
        layout.dp_rank,
        cfg.train.seed,
        device,
        eot_id,
    )
    val_sets = [
        (
            s,
            ValData(
                s.dir,
                s.meta,
                cfg.model.seq_len,
                cfg.train.eval_samples,
                batch.micro_batch_size,
                layout.dp_rank,
                layout.dp_size,
                device,
                eot_id,
            ),
        )
        for s in data.sources
    ]
    return train_data, val_sets


@dataclass(frozen=True)
class _Resume:
    """Where the checkpoints go and which one the run resumes from."""

    root: Path
    shared_root: bool
    """The checkpoint root is not inside the run directory (checkpoint.dir): it is locked too."""
    found: checkpoints.Found | None
    universal: bool
    """The checkpoint was saved on another rank count or ZeRO stage: loaded through DeepSpeed's
    universal format."""


def _checkpoint_to_resume(
    cfg: Config, data: ResolvedData, run_dir: Path, precision: Precision, layout: ParallelLayout
) -> _Resume:
    """The checkpoint to resume, checked against this run's data, model and precision (a
    collective), and room for the next one; nothing is written yet."""
    rank = layout.rank
    ckpt_root = cfg.checkpoint.root(run_dir)
    shared_root = run_directory.root_of_its_own(ckpt_root, run_dir)
    if shared_root:  # the root could hold another run's checkpoints: rank 0 looks, for every rank
        problem = distributed.from_rank0(checkpoints.owner_problem(ckpt_root, run_dir) if rank == 0 else None)
        if problem:
            raise checkpoints.CheckpointError(problem)
    restore.impose_weights_only()
    found = checkpoints.find(cfg.checkpoint.resume, ckpt_root, checkpoints.checksum_problem_together)
    if found is not None:
        problem = distributed.first_problem(restore.unpickling_problem(found.path, rank, layout.world_size))
        if problem:
            raise checkpoints.CheckpointError(problem)
        restore.check_same_data(cfg, found, data)
        restore.check_same_model(cfg, found)
        precision_change = restore.check_precision(found.state, precision)
        if precision_change:
            log.warn(precision_change)
    elif cfg.checkpoint.resume == "auto" and (died := checkpoints.incomplete_after(ckpt_root)):
        # A save that died (a kill during the stop checkpoint) leaves a directory that is not resumed.
        log.warn(f"{'; '.join(died)}; no complete checkpoint to resume: training from step 0")
    elif cfg.checkpoint.resume == "none" and checkpoints.complete_checkpoints(ckpt_root):
        raise checkpoints.CheckpointError(
            f"checkpoint error: checkpoint.resume=none but {ckpt_root} holds checkpoints of an earlier run; "
            "use another run.name or checkpoint.dir, or resume it (checkpoint.resume=auto)"
        )
    if cfg.checkpoint.interval or cfg.checkpoint.save_at_end:  # not train to checkpoint.interval for nothing
        check_room_for_a_checkpoint(cfg, ckpt_root, "at start-up")
    universal = found is not None and restore.needs_universal(
        found.state, layout.world_size, cfg.parallel.zero_stage, layout.tensor_parallel_size
    )
    return _Resume(ckpt_root, shared_root, found, universal)


def _log_opening(
    cfg: Config, inputs: _Inputs, plan_summary: list[str], run_dir: Path, val_sets: list, data_checked: str
) -> None:
    """The log's opening lines: the launch, the plan, the precision, layout and batch, the data;
    a compiled run's Inductor cache is pointed beside the runs on the way."""
    dist_env, batch, layout = inputs.dist_env, inputs.batch, inputs.layout
    log.info(f"dist-lm: {dist_env.describe()} device={hardware.device_name(inputs.device)}")
    for line in plan_summary:
        log.info(line)
    if inputs.bound_cores:
        log.warn(
            f"optimizer offload: CPU Adam steps on the host; each rank is bound to its own "
            f"{len(inputs.bound_cores)} of this node's cores (rank 0: cores {inputs.bound_cores[0]}-"
            f"{inputs.bound_cores[-1]})"
        )
    if inputs.memory_cap:
        log.warn(inputs.memory_cap)
    compiled = engine.compile_mode(cfg.parallel, inputs.device)
    if compiled and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        # The compiled kernels outlive the process and the node: a restart of this run (a resume,
        # a job requeued on another node of a shared file system) and the other runs beside it
        # (a sweep's trials) load them instead of compiling again. Inductor keys its cache by
        # the graph's content, so runs of other models beside it share it safely.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(run_dir.parent / COMPILE_CACHE)
    log.info(
        f"precision {inputs.precision} ({inputs.precision_reason}); ZeRO stage {cfg.parallel.zero_stage}"
        f"{', ' + compiled if compiled else ''}; {layout.describe()}; batch {batch.global_batch_size} = micro "
        f"{batch.micro_batch_size} x accum {batch.grad_accum_steps} x data-parallel ranks {batch.dp_size}"
    )
    if uses_chunked(cfg.model, inputs.device.type == "cuda", compiled=bool(compiled)):
        log.info(
            f"loss: DeepSpeed's chunked cross-entropy over the {cfg.model.vocab_size:,}-token vocabulary "
            "(model.cross_entropy), no fp32 logits"
        )
    log.info(f"data {inputs.data.describe()}; run dir {run_dir}")
    if data_checked:
        log.info(data_checked)
    for source, val in val_sets:
        if val.split == "train":
            log.warn(
                f"{source.dir} has no validation split: validation loss is measured on training windows "
                "(prepare the data with a --val-fraction that holds some out)"
            )


def _check_data_content(verify: str, data: ResolvedData, rank: int, world_size: int) -> tuple[dict, str]:
    """The shards' content against meta.json's hashes (data.verify), each rank a share, all agreeing
    (a collective); bad content is a UserError on every rank. Returns this rank's stamps of its
    share, for the check at each checkpoint, and what was checked, for the log."""
    shards = integrity.shards_of(data.sources)
    mode = distributed.from_rank0(integrity.mode_for(verify, shards) if rank == 0 else None)  # one stat per shard
    start = time.perf_counter()
    problem = distributed.first_problem(integrity.check_content(shards, mode, rank, world_size))
    if problem:
        raise UserError(problem)
    stamps = integrity.stamps(shards, rank, world_size)
    if mode == "none":
        return stamps, ""
    checked, unchecked = integrity.checkable(shards, mode)
    if unchecked:
        log.warn(
            f"data: {unchecked} of {len(shards)} shards were prepared before meta.json recorded the hashes "
            f"data.verify={mode} checks, so only their sizes are checked; prepare the data again, or set "
            "data.verify=full"
        )
    return stamps, (
        f"data: {checked} of {len(shards)} shards checked against meta.json's hashes ({mode}, "
        f"{time.perf_counter() - start:.1f} s)"
    ) if checked else ""


def check_room_for_a_checkpoint(cfg: Config, ckpt_root: Path, when: str) -> None:
    """Rank 0 checks the checkpoint directory is writable with room for one more checkpoint
    (the newest one's size; for a first one, CHECKPOINT_BYTES_PER_PARAMETER), for all ranks."""
    rank0 = distributed.is_rank0()
    need = (
        checkpoint.bytes_needed(ckpt_root, CHECKPOINT_BYTES_PER_PARAMETER * count_parameters(cfg.model)["total"])
        if rank0
        else 0
    )
    problem = distributed.from_rank0(checkpoint.check_room(ckpt_root, need) if rank0 else None)
    if problem:
        raise checkpoints.CheckpointError(f"checkpoint error: {when}: {problem}; any previous checkpoint is intact")
