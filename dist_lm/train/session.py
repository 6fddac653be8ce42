"""The training loop: step, evaluation cadence, logging cadence, checkpoint cadence.

Everything that can be wrong with the user's input (config, data, launch environment) is
checked in ``Trainer.__init__`` before the process group starts, so a bad run fails with one
line and nothing is written into a run directory before that. The launcher checks the data
even earlier, before torch is imported (:mod:`dist_lm.data.checks`).
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import fields
from pathlib import Path
from typing import IO

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_lm.train import checkpoint
from dist_lm.runtime import distributed
from dist_lm.runtime import engine as engine_ops
from dist_lm.plan import hardware
from dist_lm.plan import memory
from dist_lm.observe import metrics
from dist_lm.train import run_lock
from dist_lm.data import shards
from dist_lm.observe import sinks
from dist_lm.train import watchdog
from dist_lm.config.schema import Config, UserError
from dist_lm.config.io import from_dict, to_dict, to_yaml
from dist_lm.data.sampler import TrainData, ValData
from dist_lm.data.checks import resolve_data
from dist_lm.files import write_atomic
from dist_lm.train.faults import SkipCounter, SpikeGuard, TrainingDiverged
from dist_lm.runtime.ds_config import batch_plan
from dist_lm.use.generate import sample
from dist_lm.model.transformer import count_parameters, flops_per_token, parameter_shapes
from dist_lm.runtime.optim import lr_at
from dist_lm.train.preemption import StopControl
from dist_lm.observe.profiling import StepProfiler
from dist_lm.train.state import RunState


# A first checkpoint's size per parameter, before one was written to measure: the optimizer's
# fp32 master and two Adam moments (12), the module in bf16 (2; 4 in fp32) and the weights file (4).
CHECKPOINT_BYTES_PER_PARAMETER = 18


def default_run_name(preset: str) -> str:
    return f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"


class Trainer:
    def __init__(self, cfg: Config, plan_summary: list[str] = (), data: tuple[Path, dict] | None = None):
        """``plan_summary``: the lines of the --config auto plan that produced cfg, for the log.
        ``data``: what ``resolve_data(cfg)`` returned, when the caller checked the data already."""
        self.cfg = cfg
        self.start_time = time.perf_counter()
        self.dir_lock: IO[str] | None = None  # held by rank 0 from the run directory's first write
        # --- checks that need no process group: a bad input fails here, before anything starts
        self.dist_env = distributed.detect(os.environ)
        distributed.check_master_reachable(self.dist_env)
        self.device = distributed.device_for(self.dist_env)
        bound_cores: list[int] = []
        if cfg.parallel.offload_optimizer:
            engine_ops.check_cpu_adam()
            bound_cores = hardware.bind_cores(self.dist_env.local_rank, self.dist_env.local_world_size)
        self.precision, precision_reason = hardware.resolve_precision(cfg.parallel.precision, self.device)
        self.plan = batch_plan(cfg.train, self.dist_env.world_size)
        engine_ops.check_moe(cfg.model, cfg.parallel, self.dist_env.world_size)
        self.data_dir, self.meta = data or resolve_data(cfg)
        if cfg.logging.tensorboard:
            sinks.require_tensorboard()
        rank = self.dist_env.rank  # data-parallel rank: no tensor or pipeline parallelism here
        self.train_data = TrainData(self.data_dir, self.meta, cfg.model.seq_len, self.plan, rank,
                                    cfg.train.seed, self.device)
        self.val_data = ValData(self.data_dir, self.meta, cfg.model.seq_len, cfg.train.eval_samples,
                                self.plan.micro_batch_size, rank, self.plan.dp_size, self.device)

        # --- the process group, then the run directory (its name is rank 0's choice); a
        # checkpoint to resume is checked against the data before anything is written there
        port = distributed.init_process_group(self.dist_env, self.device, cfg.parallel.timeout_minutes)
        # Heartbeats from here; the deadline is armed when training starts (fit).
        self.watchdog = watchdog.start(rank, self.dist_env.world_size, self.dist_env.master_addr, port,
                                       60 * cfg.parallel.timeout_minutes)
        # From here on SIGTERM/SIGUSR1 end the run with a checkpoint (engine set-up included).
        self.stop = StopControl(cfg.train.stop_at_step, cfg.train.time_limit_minutes, self.start_time)
        self.stop_reason: str | None = None
        self.last_save_seconds = self.last_eval_seconds = 0.0
        self.run_dir = self._agree_run_dir()
        self.ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        self.resume_from = checkpoint.find(cfg.checkpoint.resume, self.ckpt_root)
        if self.resume_from is not None:
            self._check_same_data(self.resume_from.state)
            self._check_same_model(self.resume_from.state)
        elif cfg.checkpoint.resume == "none" and checkpoint.complete_checkpoints(self.ckpt_root):
            raise checkpoint.CheckpointError(
                f"checkpoint error: checkpoint.resume=none but {self.ckpt_root} holds checkpoints of an earlier run; "
                "use another run.name or checkpoint.dir, or resume it (checkpoint.resume=auto)")
        if cfg.checkpoint.interval or cfg.checkpoint.save_at_end:  # not train to checkpoint.interval for nothing
            self._check_room_for_a_checkpoint("at start-up")
        universal = self.resume_from is not None and checkpoint.needs_universal(
            self.resume_from.state, self.dist_env.world_size, cfg.parallel.zero_stage)
        self._write_run_dir()
        metrics.set_log_file(self.run_dir / "train.log")
        metrics.log(f"dist-lm: {self.dist_env.describe()} device={hardware.device_name(self.device)}")
        for line in plan_summary:
            metrics.log(line)
        if bound_cores:
            metrics.warn(f"optimizer offload: CPU Adam steps on the host; each rank is bound to its own "
                         f"{len(bound_cores)} of this node's cores (rank 0: cores {bound_cores[0]}-{bound_cores[-1]})")
        compiled = engine_ops.compile_mode(cfg.parallel, self.device)
        metrics.log(f"precision {self.precision} ({precision_reason}); ZeRO stage {cfg.parallel.zero_stage}"
                    f"{', ' + compiled if compiled else ''}; "
                    f"batch {self.plan.global_batch_size} = micro {self.plan.micro_batch_size} x accum "
                    f"{self.plan.grad_accum_steps} x ranks {self.plan.dp_size}")
        metrics.log(f"data {self.data_dir}; run dir {self.run_dir}")

        # --- model and engine
        torch.manual_seed(cfg.train.seed)
        model = engine_ops.build_model(cfg.model, cfg.parallel)
        self.flops_per_token = flops_per_token(cfg.model)
        self.peak_flops = hardware.peak_flops(self.device)
        metrics.log(f"model {count_parameters(cfg.model)['total'] / 1e6:.2f}M parameters, "
                    f"{self.flops_per_token / 1e6:.1f} MFLOP/token")
        predicted = None
        if self.device.type == "cuda":
            predicted = memory.estimate(cfg.model, cfg.parallel, self.precision, self.plan.micro_batch_size,
                                        self.plan.dp_size)
            metrics.log(f"predicted peak GPU memory per rank {predicted.describe()}")
        engine_ops.quiet(cfg.run.verbose)
        if universal:  # saved on another world size or ZeRO stage: DeepSpeed's universal format
            checkpoint.convert_to_universal(self.resume_from.path, rank, distributed.barrier)
        start_step = self.resume_from.state.step if self.resume_from else 0
        self.summary = metrics.RunSummary(
            launcher=self.dist_env.launcher, world_size=self.dist_env.world_size, precision=self.precision,
            zero_stage=cfg.parallel.zero_stage, global_batch_size=self.plan.global_batch_size,
            micro_batch_size=self.plan.micro_batch_size, grad_accum_steps=self.plan.grad_accum_steps,
            parameters=count_parameters(cfg.model)["total"], flops_per_token=self.flops_per_token,
            predicted_peak_mem_gb=predicted.total / memory.GB if predicted else None, start_step=start_step)
        self.summary.write(self.run_dir)
        self.engine = engine_ops.initialize(model, cfg.parallel, cfg.optim, self.plan, self.precision, self.device,
                                            load_universal=universal, start_step=start_step, verbose=cfg.run.verbose)
        # Lines past start_step in the run directory's logs were written by an earlier process.
        problem = None
        try:  # rank 0's sinks; wandb=online that cannot start is a UserError there, and so on every rank
            self.metrics = metrics.MetricsWriter(self.run_dir, cfg.logging, cfg.run.name, to_dict(cfg), start_step)
        except UserError as e:
            problem = str(e)
        problem = distributed.from_rank0(problem)
        if problem:
            raise UserError(problem)
        self.profiler = StepProfiler(cfg.logging.profile_start, cfg.logging.profile_steps, self.run_dir / "profile",
                                     f"rank{rank}", self.device)
        self.sample_log = sinks.SampleLog(self.run_dir, rank, self.dist_env.world_size, start_step) \
            if cfg.data.log_samples else None
        self.step = 0
        self.best_val_loss = math.inf
        self.val_history: list[tuple[int, float]] = []  # this process's evaluations, for the summary
        self.last_saved_step: int | None = None
        self.evals_without_improvement = 0
        self.last_val_loss: tuple[int, float] | None = None  # (step, loss) of the newest evaluation
        self.skips = SkipCounter(cfg.train.max_skipped_steps, self.precision, self.ckpt_root)
        self.spike_guard = SpikeGuard(cfg.train.spike_factor) if cfg.train.spike_factor else None
        self.window = metrics.LogWindow(self.device)
        self.elapsed_before = 0.0  # elapsed_s of earlier processes of this run (from the checkpoint)
        if self.resume_from is not None:
            self._resume(self.resume_from, universal)

    # ----------------------------------------------------------------------------------- set-up
    def _agree_run_dir(self) -> Path:
        run = self.cfg.run
        name = [run.name or default_run_name(self.cfg.preset)]
        dist.broadcast_object_list(name, src=0)  # every rank uses rank 0's timestamp
        run.name = name[0]
        run_dir = Path(run.dir or Path("runs") / run.name)
        run.dir = str(run_dir)
        return run_dir

    def _write_run_dir(self) -> None:
        """Take the run directory (its lock: dist_lm.train.run_lock), then write its config."""
        problem = None
        if distributed.is_rank0():
            try:
                self.dir_lock = run_lock.lock(self.run_dir)
            except run_lock.RunDirInUse as e:
                problem = str(e)
        problem = distributed.from_rank0(problem)
        if problem:
            raise run_lock.RunDirInUse(problem)
        if distributed.is_rank0():
            write_atomic(self.run_dir / "config.yaml", to_yaml(self.cfg))
        dist.barrier()

    def _check_same_data(self, state: RunState) -> None:
        """Refuse to resume on other data (unless checkpoint.allow_data_change)."""
        where = self.resume_from.path
        if state.tokenizer_sha256 != self.meta["tokenizer_sha256"]:
            problem = (f"{where} was trained on tokens of tokenizer {str(state.tokenizer_sha256)[:12]}, but "
                       f"{self.data_dir} was made with {str(self.meta['tokenizer_sha256'])[:12]}")
        else:
            saved, now = state.data_fingerprint, shards.fingerprint(self.meta)
            if saved is None or saved["sha256"] == now["sha256"]:
                return
            problem = (f"{where} was trained on data {saved['sha256'][:12]} ({saved['train_tokens']:,} training tokens), "
                       f"but {self.data_dir} is {now['sha256'][:12]} ({now['train_tokens']:,} tokens)")
        if self.cfg.checkpoint.allow_data_change:
            metrics.warn(f"{problem}; continuing as --allow-data-change asks (the data order continues by sample count)")
            return
        raise UserError(f"data error: {problem}; resume with the same data.dir, pass --allow-data-change to continue "
                        "on this data, or start a new run.name")

    def _check_same_model(self, state: RunState) -> None:
        """Refuse, before anything is written, a checkpoint whose weights do not fit this run's model
        (e.g. --allow-data-change onto data of another vocabulary size)."""
        saved = from_dict(state.config, str(self.resume_from.path / checkpoint.STATE)).model
        theirs, ours = parameter_shapes(saved), parameter_shapes(self.cfg.model)
        if theirs == ours:
            return
        name = next(n for n in [*ours, *theirs] if theirs.get(n) != ours.get(n))  # the first, in the model's order
        changed = [f"model.{f.name} {getattr(saved, f.name)} -> {getattr(self.cfg.model, f.name)}"
                   for f in fields(saved) if getattr(saved, f.name) != getattr(self.cfg.model, f.name)]
        raise UserError(f"config error: {self.resume_from.path} holds another model: {name} is {theirs.get(name)} there "
                        f"and {ours.get(name)} here ({', '.join(changed)}); resume with the checkpoint's model "
                        "settings and data, or start a new run.name")

    def _resume(self, found: checkpoint.Found, universal: bool) -> None:
        checkpoint.load(self.engine, found, universal)
        if universal:
            engine_ops.restore_weight_decay(self.engine, self.cfg.optim)
        state = found.state
        self.step = state.step
        self.best_val_loss = state.best_val_loss if state.best_val_loss is not None else math.inf
        self.train_data.load_state_dict(state.data)
        self.elapsed_before = state.elapsed_s
        self.evals_without_improvement = state.evals_without_improvement
        self.skips.total = state.skipped_steps
        if state.log_window is not None:  # (older checkpoints: the first row averages the steps since the resume)
            self.window.load_state_dict(state.log_window, self.dist_env.rank, self.dist_env.world_size)
        rng = found.path / f"rng-rank{self.dist_env.rank}.json"
        if not universal and rng.is_file():  # on another world size the ranks are not the same ranks
            checkpoint.set_rng_state(json.loads(rng.read_text()))
        if found.note:
            metrics.warn(found.note)
        how = (f" via DeepSpeed's universal format (saved on {state.world_size} ranks at ZeRO stage "
               f"{state.zero_stage})") if universal else ""
        metrics.log(f"resumed from {found.path} at step {self.step} ({self.train_data.samples_consumed} samples consumed){how}")

    def state_dict(self) -> RunState:
        """Our resumable state, saved as state.json beside the engine's own checkpoint (a collective:
        the log window gathers every rank's sums)."""
        best = self.best_val_loss if math.isfinite(self.best_val_loss) else None  # JSON has no infinity
        val = self.last_val_loss[1] if self.last_val_loss and self.last_val_loss[0] == self.step else None
        return RunState(
            step=self.step, config=to_dict(self.cfg), data=self.train_data.state_dict(), best_val_loss=best,
            val_loss=val, elapsed_s=self.elapsed_s(), evals_without_improvement=self.evals_without_improvement,
            skipped_steps=self.skips.total, tokens=self.tokens_seen(), world_size=self.dist_env.world_size,
            zero_stage=self.cfg.parallel.zero_stage, precision=self.precision,
            parameters=count_parameters(self.cfg.model)["total"], tokenizer_sha256=self.meta["tokenizer_sha256"],
            data_fingerprint=shards.fingerprint(self.meta), wandb_run_id=self.metrics.wandb_run_id,
            log_window=self.window.state_dict())

    def tokens_seen(self) -> int:
        return self.train_data.samples_consumed * self.cfg.model.seq_len

    # ------------------------------------------------------------------------------------ loop
    def fit(self) -> None:
        cfg = self.cfg.train
        if self.step >= cfg.max_steps:
            metrics.log(f"nothing to do: the run is already at step {self.step} of train.max_steps={cfg.max_steps}")
            return
        metrics.log(f"training from step {self.step} to {cfg.max_steps}"
                    f"{engine_ops.compile_wait(self.cfg.parallel, self.device, self.step)}")
        self.engine.train()
        self.watchdog.progress(f"training step {self.step + 1}")
        progress = metrics.Progress(self.cfg.logging.progress, cfg.max_steps, self.step)
        self.window.restart_clock()
        first_step = self.step
        try:
            while self.step < cfg.max_steps and (cfg.max_tokens is None or self.tokens_seen() < cfg.max_tokens):
                step_start = time.perf_counter()
                self.profiler.before_step(self.step + 1)
                grad_norm, micro_steps = self._train_step()
                self.step += 1
                self.watchdog.progress(f"training step {self.step + 1}")
                self.profiler.after_step(self.step)
                self.window.add_step()
                if self.step == first_step + 1:
                    self.summary.first_step_s = time.perf_counter() - self.start_time
                    self.summary.write(self.run_dir)
                    metrics.log(f"first step done {self.summary.first_step_s:.1f} s after the trainer started")
                row: dict = {}
                if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                    row |= self._train_metrics(micro_steps, grad_norm)
                    self.window.reset()
                if cfg.eval_interval and self.step % cfg.eval_interval == 0:
                    row |= self.evaluate()
                    if cfg.sample_at_eval and cfg.sample_tokens:
                        self.print_sample()
                if row:
                    self._emit(row)
                progress.update(row)
                # (the last step's checkpoint comes after the final evaluation, below)
                if self.cfg.checkpoint.interval and self.step % self.cfg.checkpoint.interval == 0 \
                        and self.step < cfg.max_steps:
                    self.save()
                if self._patience_exhausted():
                    break
                eval_next = cfg.eval_interval and (self.step + 1) % cfg.eval_interval == 0
                self.stop_reason = self.stop.reason_to_stop(self.step, time.perf_counter() - step_start,
                                                            self.last_save_seconds,
                                                            self.last_eval_seconds if eval_next else 0.0)
                if self.stop_reason:
                    metrics.log(f"stopping after step {self.step} of {cfg.max_steps}: {self.stop_reason}; "
                                "run the same run directory again to continue")
                    break
        finally:
            progress.close()
        if self.stop_reason:  # a stop on purpose: a checkpoint, and no more than that
            if self.last_saved_step != self.step:
                self.save()
            return
        if cfg.eval_interval and self.step % cfg.eval_interval != 0:  # the final evaluation
            self._emit(self.evaluate())
        if len(self.val_history) >= 2:
            (first_at, first), (last_at, last) = self.val_history[0], self.val_history[-1]
            metrics.log(f"validation loss {first:.3f} -> {last:.3f} (perplexity {math.exp(first):.1f} -> "
                        f"{math.exp(last):.1f}) from step {first_at} to {last_at}")
        if self.last_saved_step != self.step and self.cfg.checkpoint.save_at_end:
            self.save()
        if cfg.sample_tokens:
            self.print_sample()

    def _train_step(self) -> tuple[torch.Tensor | float | None, int]:
        """One optimizer step over this rank's micro-batches; adds their losses to the log window.
        Returns the gradient norm and the number of micro-batches."""
        engine = self.engine
        engine_ops.set_lr(engine, lr_at(self.step, self.cfg.optim, self.cfg.train.max_steps), self.cfg.optim)
        batches = self.train_data.next_batches()
        if self.sample_log is not None:
            self.sample_log.write(self.step + 1, self.train_data.last_ids)
        for i, (x, y) in enumerate(batches):
            loss = engine(x, y)
            skip = self.spike_guard is not None and self._is_spike(loss, i, len(batches))
            # A skipped micro-batch still goes through backward (with no gradient), so that
            # DeepSpeed's micro-step count and ZeRO's collectives stay in line on every rank.
            engine.backward(loss * 0.0 if skip else loss)
            aux = engine.module.aux_loss  # the experts' load-balancing loss, inside ``loss``
            if aux is not None:
                self.window.aux_sum += aux.detach().float()
                loss = loss.detach() - self.cfg.model.moe_aux_loss_coef * aux.detach().float()
            self.window.loss_sum += loss.detach()
            if i < len(batches) - 1:
                engine.step()  # DeepSpeed counts micro-steps; it updates only at the boundary
        if self.cfg.train.check_finite:
            self._check_finite(self.window.loss_sum)
        grad_norm, applied = engine_ops.step(engine)
        self.skips.update(applied, grad_norm, self.step + 1)
        return grad_norm, len(batches)

    def _is_spike(self, loss: torch.Tensor, micro: int, micros: int) -> bool:
        """Whether this micro-batch's loss (averaged over ranks) spikes above the running mean; a
        spike is logged with the global sample ids of the micro-batch on every rank."""
        mean_loss = loss.detach().float().clone()
        dist.all_reduce(mean_loss)  # host-device sync per micro-batch: only with the guard on
        value = mean_loss.item() / self.dist_env.world_size
        spike = self.spike_guard.check(value)
        if spike:
            micro_size = len(self.train_data.last_ids) // micros
            ids = self.train_data.last_ids[micro * micro_size:(micro + 1) * micro_size].tolist()
            everyone: list = [None] * self.dist_env.world_size
            dist.all_gather_object(everyone, ids)
            record = {"step": self.step + 1, "micro_batch": micro, "loss": value,
                      "running_mean": self.spike_guard.mean, "skipped": self.cfg.train.spike_skip,
                      "sample_ids": sorted(i for rank_ids in everyone for i in rank_ids)}
            metrics.warn(f"step {record['step']}: loss spike {value:.4f} > {self.cfg.train.spike_factor} x running "
                         f"mean {record['running_mean']:.4f} on samples {record['sample_ids']}"
                         + ("; skipped" if self.cfg.train.spike_skip else ""))
            if distributed.is_rank0():
                with open(self.run_dir / "spikes.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
        return spike and self.cfg.train.spike_skip

    def _train_metrics(self, micro_steps: int, grad_norm) -> dict:
        """``micro_steps``: micro-batches per step on each rank."""
        # The window's mean loss over every micro-batch of every rank. This all-reduce is a
        # host-device sync point, which is why it happens only every log_interval steps.
        window = self.window
        micro_batches = window.steps * micro_steps * self.plan.dp_size
        dist.all_reduce(window.loss_sum)  # in place: the window is reset after this row
        loss = window.loss_sum.item() / micro_batches
        if not math.isfinite(loss):
            self.metrics.alert("non-finite loss", f"{self.run_dir.name} step {self.step}: loss {loss}")
        steps, seconds = window.timed_steps, time.perf_counter() - window.start
        tokens = steps * self.plan.global_batch_size * self.cfg.model.seq_len
        tokens_per_s, mfu = metrics.throughput(tokens, seconds, self.flops_per_token, self.dist_env.world_size,
                                               self.peak_flops)
        lr = lr_at(self.step - 1, self.cfg.optim, self.cfg.train.max_steps)  # the last step's (Muon: x muon_lr/lr)
        aux = None
        if "moe" in self.cfg.model.layer_types:
            dist.all_reduce(window.aux_sum)
            aux = window.aux_sum.item() / micro_batches
        return {"loss": loss, "aux_loss": aux, "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens_per_s": tokens_per_s, "mfu": mfu, "step_time": seconds / steps,
                "peak_mem_gb": self._peak_memory_gb()}

    def _emit(self, row: dict) -> None:
        row = {"step": self.step, "tokens": self.tokens_seen(), **row, "elapsed_s": self.elapsed_s()}
        self.metrics.write(row)
        if "loss" in row:
            metrics.log(metrics.format_step(row))
        if "val_loss" in row:
            metrics.log(f"step {self.step:>6} | val loss {row['val_loss']:.4f} | val ppl {row['val_ppl']:.2f}")

    def elapsed_s(self) -> float:
        """Training time of the run, earlier processes of it (before a resume) included."""
        return self.elapsed_before + time.perf_counter() - self.start_time

    def _patience_exhausted(self) -> bool:
        patience = self.cfg.train.early_stop_patience
        if patience and self.evals_without_improvement >= patience:
            metrics.log(f"early stop at step {self.step}: {patience} evaluations without improving on "
                        f"the best validation loss {self.best_val_loss:.4f} by {self.cfg.train.early_stop_min_delta}")
            return True
        return False

    def _peak_memory_gb(self) -> float:
        """Peak GPU memory allocated on this rank; on CPU the process's peak resident memory."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB

    def _check_finite(self, loss_sum: torch.Tensor) -> None:
        """Raise, on every rank alike, if this step's loss or any gradient is NaN or inf."""
        bad = engine_ops.first_nonfinite_grad(self.engine)  # a collective under ZeRO-3: every rank calls
        loss_bad = torch.tensor(0.0 if torch.isfinite(loss_sum) else 1.0, device=self.device)
        dist.all_reduce(loss_bad, op=dist.ReduceOp.MAX)  # losses are per rank: agree before raising
        if loss_bad.item():
            raise TrainingDiverged(f"step {self.step + 1}: loss is not finite on some rank"
                                   + (f"; first non-finite gradient: {bad}" if bad else ""))
        if bad is not None:  # (self.step counts the steps done: this is the next one)
            raise TrainingDiverged(f"step {self.step + 1}: gradient of {bad} is not finite")

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean validation loss over the fixed validation windows, the same for every rank count."""
        start = time.perf_counter()
        self.engine.eval()
        totals = torch.zeros(2, device=self.device, dtype=torch.float64)  # loss sum, token count
        # Every rank runs the same number of forward passes (ZeRO-3 forwards are collective): its
        # own batches, then padding. A signal between any two ends the evaluation on all ranks.
        for batch in self.val_data.batches + [None] * self.val_data.padding_batches:
            if self.stop.signalled():
                self.engine.train()
                return {}
            self.watchdog.progress(f"evaluating at step {self.step}")
            if batch is None:
                self.engine(self.val_data.filler)
                continue
            x, y = batch
            logits = self.engine(x)
            totals[0] += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double()
            totals[1] += y.numel()
        dist.all_reduce(totals)  # sync point
        val_loss = (totals[0] / totals[1]).item()
        if val_loss < self.best_val_loss - self.cfg.train.early_stop_min_delta:
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        self.best_val_loss = min(self.best_val_loss, val_loss)
        self.val_history.append((self.step, val_loss))
        self.last_val_loss = (self.step, val_loss)
        self.engine.train()
        self.last_eval_seconds = time.perf_counter() - start
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    def _check_room_for_a_checkpoint(self, when: str) -> None:
        """Rank 0 checks the checkpoint directory is writable with room for one more checkpoint
        (the newest one's size; for a first one, CHECKPOINT_BYTES_PER_PARAMETER), for all ranks."""
        rank0 = distributed.is_rank0()
        need = checkpoint.bytes_needed(self.ckpt_root, CHECKPOINT_BYTES_PER_PARAMETER *
                                       count_parameters(self.cfg.model)["total"]) if rank0 else 0
        problem = distributed.from_rank0(checkpoint.check_room(self.ckpt_root, need) if rank0 else None)
        if problem:
            raise checkpoint.CheckpointError(f"checkpoint error: {when}: {problem}; any previous checkpoint is intact")

    def save(self) -> None:
        if self.skips.in_a_row:  # the weights since the first skipped update may be bad: keep the good ones
            metrics.warn(f"step {self.step}: no checkpoint while updates are being skipped (since step "
                         f"{self.skips.first_skipped}); the last good one stays the newest")
            return
        start = time.perf_counter()
        rank0 = distributed.is_rank0()
        self._check_room_for_a_checkpoint(f"step {self.step}")
        path = self.ckpt_root / checkpoint.tag_for(self.step)
        self.watchdog.progress(f"saving checkpoint {path}", 60 * self.cfg.checkpoint.save_timeout_minutes,
                               "checkpoint.save_timeout_minutes")
        checkpoint.save(self.engine, self.ckpt_root, self.step, self.state_dict(), self.dist_env.rank,
                        lambda: engine_ops.master_weights(self.engine, self.dist_env.rank, self.dist_env.world_size),
                        engine_ops.tied_names(self.engine.module), distributed.barrier, distributed.any_rank)
        self.watchdog.progress(f"training step {self.step + 1}")
        if rank0:
            for old in checkpoint.prune(self.ckpt_root, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_best):
                metrics.log(f"removed old checkpoint {old.name}")
            checkpoint.update_best(self.ckpt_root)
        self.last_save_seconds = time.perf_counter() - start
        self.last_saved_step = self.step
        metrics.log(f"saved checkpoint {path}")

    def print_sample(self) -> None:
        from tokenizers import Tokenizer

        if not self.meta.get("tokenizer"):
            metrics.warn(f"no sample: {self.data_dir} has no tokenizer.json to decode with")
            return
        self.watchdog.progress(f"sampling at step {self.step}")
        tokenizer = Tokenizer.from_file(str(self.data_dir / self.meta["tokenizer"]))
        eot = self.meta.get("eot_id")
        prompt = tokenizer.encode(self.cfg.train.sample_prompt).ids or [eot if eot is not None else 0]
        self.engine.eval()
        out = sample(self.engine.module, prompt, self.cfg.train.sample_tokens, self.cfg.model.seq_len,
                     self.device, seed=self.cfg.train.seed, stop_id=eot)
        self.engine.train()
        metrics.log(f"sample at step {self.step}: " + tokenizer.decode(prompt + out))

    def close(self) -> None:
        self.train_data.close()
        if self.sample_log is not None:
            self.sample_log.close()
        self.metrics.close()
        metrics.set_log_file(None)
        if self.dir_lock is not None:
            self.dir_lock.close()  # the directory is free for the next process
