"""The training loop: the cadences of a run built by :mod:`dist_lm.train.session` (step, evaluate,
log, checkpoint, stop), and the counters a checkpoint carries (:meth:`Trainer.state_dict`)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from dist_lm.config.io import to_dict
from dist_lm.config.schema import UserError
from dist_lm.data import integrity
from dist_lm.model.counts import count_parameters, flops_per_token
from dist_lm.observe import log, metrics
from dist_lm.runtime import distributed, engine, hardware
from dist_lm.runtime.ds_config import clips_itself
from dist_lm.runtime.optim import lr_at
from dist_lm.store import checkpoints
from dist_lm.store.state import RunState
from dist_lm.train import async_checkpoint, checkpoint, faults
from dist_lm.train.faults import SkipCounter, SpikeGuard
from dist_lm.train.preemption import WRITE_FAILED
from dist_lm.train.session import Session, check_room_for_a_checkpoint
from dist_lm.train.validation import Evaluations, Sampler, sample_text, validation_losses


class Trainer:
    def __init__(self, session: Session, sample: Sampler | None = None):
        self.session = s = session
        self.sample = sample
        self.cfg, self.model_engine, self.run_dir = s.cfg, s.model_engine, s.run_dir
        self.stop, self.watchdog = s.stop, s.watchdog
        self.flops_per_token = flops_per_token(s.cfg.model)
        self.peak_flops = hardware.peak_flops(s.device)
        self.stop_reason: str | None = None
        self.last_save_seconds = 0.0
        self.step = 0
        self.last_saved_step: int | None = None
        # checkpoint.async_save: DeepSpeed saves through a staging engine; the save being written
        self.staging = (
            engine.install_staging(self.model_engine, max(1, s.dist_env.local_world_size))
            if s.cfg.checkpoint.saves_async(s.device.type == "cuda")
            else None
        )
        self.pending: async_checkpoint.PendingSave | None = None
        self.evaluations = Evaluations(s.cfg.train.early_stop_min_delta, s.cfg.train.early_stop_patience)
        self.clips_itself = clips_itself(s.cfg.parallel, s.precision)
        self.share_weight = engine.share_weight(s.cfg.parallel, s.layout)
        self.skips = SkipCounter(s.cfg.train.max_skipped_steps, s.precision, s.ckpt_root)
        self.spike_guard = (
            SpikeGuard(s.cfg.train.spike_factor, s.run_dir, s.cfg.train.spike_skip)
            if s.cfg.train.spike_factor
            else None
        )
        self.window = metrics.LogWindow(s.device)
        self._write_failure: str | None = None  # this rank's logs could not be written (a full disk)
        self.elapsed_before = 0.0  # elapsed_s of earlier processes of this run (from the checkpoint)
        if s.resumed is not None:
            self.load_state_dict(s.resumed)

    def load_state_dict(self, state: RunState) -> None:
        """The loop's counters from a checkpoint (the session loaded the engine and the data)."""
        self.step = state.step
        self.evaluations.best = state.best_val_loss if state.best_val_loss is not None else math.inf
        self.elapsed_before = state.elapsed_s
        self.evaluations.without_improvement = state.evals_without_improvement
        self.skips.total = state.skipped_steps
        if state.log_window is not None:  # (older checkpoints: the first row averages the steps since the resume)
            self.window.load_state_dict(state.log_window, self.session.dist_env.rank, self.session.dist_env.world_size)

    def state_dict(self) -> RunState:
        """Our resumable state, saved as state.json beside the engine's own checkpoint (a collective:
        the log window gathers every rank's sums)."""
        s = self.session
        return RunState(
            step=self.step,
            config=to_dict(self.cfg),
            data=s.train_data.state_dict(),
            best_val_loss=self.evaluations.best_or_none(),
            val_loss=self.evaluations.at(self.step),
            elapsed_s=self.elapsed_s(),
            evals_without_improvement=self.evaluations.without_improvement,
            skipped_steps=self.skips.total,
            tokens=self.tokens_seen(),
            world_size=s.dist_env.world_size,
            zero_stage=self.cfg.parallel.zero_stage,
            precision=s.precision,
            parameters=count_parameters(self.cfg.model)["total"],
            tokenizer_sha256=s.data.meta["tokenizer_sha256"],
            data_fingerprint=s.data.fingerprint(),
            wandb_run_id=s.metrics.wandb_run_id,
            log_window=self.window.state_dict(),
            run_dir=str(self.run_dir.resolve()),
        )

    def tokens_seen(self) -> int:
        return self.session.train_data.samples_consumed * self.cfg.model.seq_len

    def elapsed_s(self) -> float:
        """Training time of the run, earlier processes of it (before a resume) included."""
        return self.elapsed_before + time.perf_counter() - self.session.start_time

    # ------------------------------------------------------------------------------------ loop
    def fit(self) -> None:
        cfg, s = self.cfg.train, self.session
        if self.step >= cfg.max_steps:
            log.info(f"nothing to do: the run is already at step {self.step} of train.max_steps={cfg.max_steps}")
            return
        if self.stop.stop_at_step is not None and self.step >= self.stop.stop_at_step:  # e.g. 0: the imported weights
            self.stop_reason = f"train.stop_at_step={self.stop.stop_at_step}"
            log.info(f"stopping at step {self.step}: {self.stop_reason}; {s.stop.how_to_continue}")
            if s.resumed is None:  # (a resumed run's step has its checkpoint: the one it resumed from)
                self.save()
                self.finish_pending_save(wait=True)
            return
        log.info(
            f"training from step {self.step} to {cfg.max_steps}"
            f"{engine.compile_wait(self.cfg.parallel, s.device, self.step)}"
        )
        self.model_engine.train()
        self.watchdog.progress(f"training step {self.step + 1}")
        progress = log.Progress(self.cfg.logging.progress, cfg.max_steps, self.step)
        self.window.restart_clock()
        first_step = self.step
        try:
            while self.step < cfg.max_steps and (cfg.max_tokens is None or self.tokens_seen() < cfg.max_tokens):
                step_start = time.perf_counter()
                s.profiler.before_step(self.step + 1)
                grad_norm, micro_steps = self._train_step()
                self.step += 1
                if self.pending is not None:  # a save written while training goes on: complete yet?
                    self.finish_pending_save(wait=False)
                self.watchdog.progress(f"training step {self.step + 1}")
                s.profiler.after_step(self.step)
                self.window.add_step()
                if self.step == first_step + 1:
                    s.summary.first_step_s = time.perf_counter() - s.start_time
                    try:
                        s.summary.write(self.run_dir)
                    except OSError as e:
                        self._write_failure = f"writing {self.run_dir / metrics.RUN_SUMMARY} failed ({e.strerror or e})"
                    log.info(f"first step done {s.summary.first_step_s:.1f} s after the trainer started")
                row: dict = {}
                if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                    row |= self._train_metrics(micro_steps, grad_norm)
                    self.window.reset()
                evaluates = cfg.eval_interval and self.step % cfg.eval_interval == 0
                if evaluates:
                    row |= self.evaluate()
                    if cfg.sample_at_eval and cfg.sample_tokens:
                        self.print_sample()
                if row:
                    self._emit(row)
                progress.update(row)
                # (the last step's checkpoint comes after the final evaluation, below)
                saves = (
                    self.cfg.checkpoint.interval
                    and self.step % self.cfg.checkpoint.interval == 0
                    and self.step < cfg.max_steps
                )
                if saves:
                    self.save()
                if evaluates or saves:  # tokens/s and step_time time training steps, not these
                    self.window.restart_clock()
                if self._patience_exhausted():
                    break
                eval_next = cfg.eval_interval and (self.step + 1) % cfg.eval_interval == 0
                self.stop_reason = self.stop.reason_to_stop(
                    self.step,
                    time.perf_counter() - step_start,
                    self.last_save_seconds,
                    self.evaluations.seconds if eval_next else 0.0,
                    self.write_failure() is not None,
                )
                if self.stop_reason == WRITE_FAILED:
                    break
                if self.stop_reason:
                    log.info(
                        f"stopping after step {self.step} of {cfg.max_steps}: {self.stop_reason}; "
                        f"{self.session.stop.how_to_continue}"
                    )
                    break
        finally:
            progress.close()
        self.skips.settle()
        if self.stop_reason == WRITE_FAILED:  # a full disk: no checkpoint (it would not fit either)
            self.raise_write_failure()
        if self.stop_reason:  # a stop on purpose: a checkpoint, and no more than that
            if self.last_saved_step != self.step:
                self.save()
            self.finish_pending_save(wait=True)
            return
        if cfg.eval_interval and self.step % cfg.eval_interval != 0:  # the final evaluation
            self._emit(self.evaluate())
        if summary := self.evaluations.summary():
            log.info(summary)
        self.skips.check_run_end()
        if self.last_saved_step != self.step and self.cfg.checkpoint.save_at_end:
            self.save()
        self.finish_pending_save(wait=True)
        if cfg.sample_tokens:
            self.print_sample()
        if distributed.any_rank(self.write_failure() is not None):  # after the last step's rows
            self.raise_write_failure()

    def write_failure(self) -> str | None:
        """Why this rank could not write its logs (metrics, train.log, run.json, samples, spikes), or None."""
        s = self.session
        writers = [s.metrics, s.sample_log, self.spike_guard]
        return self._write_failure or log.write_failure() or next((w.failure for w in writers if w and w.failure), None)

    def raise_write_failure(self) -> None:
        """End the run on every rank (a collective) with the failing rank's line."""
        failure = distributed.first_problem(self.write_failure())
        raise UserError(
            f"run error: {failure} after step {self.step}; the checkpoints so far are kept, and "
            "metrics.jsonl and metrics.csv hold whole rows: free some space, then " + self.session.stop.how_to_continue
        )

    def _train_step(self) -> tuple[torch.Tensor | float | None, int]:
        """One optimizer step over this rank's micro-batches; adds their losses to the log window.
        Returns the gradient norm and the number of micro-batches."""
        model_engine, data = self.model_engine, self.session.train_data
        engine.set_lr(model_engine, lr_at(self.step, self.cfg.optim, self.cfg.train.max_steps), self.cfg.optim)
        batches = data.next_batches()
        if self.session.sample_log is not None:
            self.session.sample_log.write(self.step + 1, data.last_ids)
        for i, (x, y, *documents) in enumerate(batches):  # documents: with data.document_mask
            parts = model_engine(x, y, documents=documents[0]) if documents else model_engine(x, y)
            skip = self.spike_guard is not None and self.spike_guard.check_micro_batch(
                parts.total, self.step + 1, i, len(batches), data.last_ids, self.session.layout
            )
            # A skipped micro-batch still goes through backward (with no gradient), so that
            # DeepSpeed's micro-step count and ZeRO's collectives stay in line on every rank.
            loss = parts.total * 0.0 if skip else parts.total
            model_engine.backward(loss * self.share_weight if self.share_weight != 1.0 else loss)
            # The logged loss is the cross-entropy; the experts' load-balancing loss and the
            # z-loss, both in the total trained on, are logged apart (LossParts).
            self.window.loss_sum += parts.cross_entropy.detach()
            if parts.aux is not None:
                self.window.aux_sum += parts.aux.detach()
            if parts.z is not None:
                self.window.z_sum += parts.z.detach()
            if i < len(batches) - 1:
                model_engine.step()  # DeepSpeed counts micro-steps; it updates only at the boundary
        if self.cfg.train.check_finite:
            faults.check_finite(model_engine, self.window.loss_sum, self.step + 1)
        grad_norm, applied = engine.step(model_engine, self.cfg.optim.grad_clip, self.clips_itself)
        self.skips.update(applied, grad_norm, self.step + 1)
        return grad_norm, len(batches)

    def _train_metrics(self, micro_steps: int, grad_norm) -> dict:
        """``micro_steps``: micro-batches per step on each rank."""
        window, s = self.window, self.session
        # Every rank's sums are added up: a window's loss is there once per tensor-parallel rank
        # (each computes it whole), and once in shares over the sequence-parallel ranks.
        micro_batches = window.steps * micro_steps * s.batch.dp_size * s.layout.loss_copies
        loss, aux, z = window.means(micro_batches, "moe" in self.cfg.model.layer_types, bool(self.cfg.optim.z_loss))
        if z is not None:
            z *= self.cfg.optim.z_loss  # the term added to the loss
        if not math.isfinite(loss):
            s.metrics.alert("non-finite loss", f"{self.run_dir.name} step {self.step}: loss {loss}")
        steps, seconds = window.timed_steps, time.perf_counter() - window.start
        tokens = steps * s.batch.global_batch_size * self.cfg.model.seq_len
        tokens_per_s, mfu = metrics.throughput(
            tokens, seconds, self.flops_per_token, s.dist_env.world_size, self.peak_flops
        )
        lr = lr_at(self.step - 1, self.cfg.optim, self.cfg.train.max_steps)  # the last step's (Muon: x muon_lr/lr)
        return {
            "loss": loss,
            "aux_loss": aux,
            "z_loss": z,
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens_per_s": tokens_per_s,
            "mfu": mfu,
            "step_time": seconds / steps,
            "peak_mem_gb": metrics.peak_memory_gb(s.device),
        }

    def _emit(self, row: dict) -> None:
        row = {"step": self.step, "tokens": self.tokens_seen(), **row, "elapsed_s": self.elapsed_s()}
        self.session.metrics.write(row)  # a failure: the run stops after this step (write_failure)
        if "loss" in row:
            log.info(metrics.format_step(row))
        if "val_loss" in row:
            log.info(f"step {self.step:>6} | val loss {row['val_loss']:.4f} | val ppl {row['val_ppl']:.2f}")

    def _patience_exhausted(self) -> bool:
        if not self.evaluations.patience_exhausted():
            return False
        log.info(
            f"early stop at step {self.step}: {self.evaluations.patience} evaluations without improving on the "
            f"best validation loss {self.evaluations.best:.4f} by {self.evaluations.min_delta}"
        )
        return True

    def evaluate(self) -> dict:
        """Mean validation loss over the fixed validation windows, the same for every rank count;
        in a mixture each source's too, and their mean weighted as the mixture is."""
        start, s = time.perf_counter(), self.session
        losses = validation_losses(self.model_engine, s.val_sets, s.device, self.stop, self.watchdog, self.step)
        if losses is None:  # a signal: the evaluation ends on every rank
            return {}
        val_loss = sum(weight * loss for weight, loss in losses.values())
        self.evaluations.add(self.step, val_loss, time.perf_counter() - start)
        row = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        if len(losses) > 1:
            row |= {f"val_loss_{name}": loss for name, (_, loss) in losses.items()}
        return row

    def save(self) -> None:
        if distributed.any_rank(self.write_failure() is not None):
            return  # this step's rows are not on disk: a checkpoint of it would resume past them
        self.skips.settle()
        if self.skips.in_a_row:  # the weights since the first skipped update may be bad: keep the good ones
            log.warn(
                f"step {self.step}: no checkpoint while updates are being skipped (since step "
                f"{self.skips.first_skipped}); the last good one stays the newest"
            )
            return
        self.finish_pending_save(wait=True)  # one save in flight at a time
        start, s = time.perf_counter(), self.session
        changed = distributed.first_problem(integrity.changed(s.data_stamps))
        if changed:  # the steps since the last checkpoint may have read other data: keep that checkpoint
            raise UserError(changed)
        check_room_for_a_checkpoint(self.cfg, s.ckpt_root, f"step {self.step}")
        path = s.ckpt_root / checkpoints.tag_for(self.step)
        self.watchdog.progress(
            f"saving checkpoint {path}",
            60 * self.cfg.checkpoint.save_timeout_minutes,
            "checkpoint.save_timeout_minutes",
        )
        rank, world_size = s.dist_env.rank, s.dist_env.world_size
        into = self.staging.buffers if self.staging is not None else None  # an asynchronous save's copies
        weights = lambda: engine.master_weights(self.model_engine, rank, world_size, into)  # noqa: E731
        self.stop.saving = path  # a second Ctrl-C removes it while it is incomplete
        try:
            if self.staging is not None:
                self.pending = async_checkpoint.start(
                    self.model_engine,
                    self.staging,
                    s.ckpt_root,
                    self.step,
                    self.state_dict(),
                    rank,
                    weights,
                    engine.tied_names(self.model_engine.module),
                )
            else:
                checkpoint.save(
                    self.model_engine,
                    s.ckpt_root,
                    self.step,
                    self.state_dict(),
                    rank,
                    world_size,
                    weights,
                    engine.tied_names(self.model_engine.module),
                )
        finally:
            self.stop.saving = None
        self.watchdog.progress(f"training step {self.step + 1}")
        self.last_save_seconds = time.perf_counter() - start
        self.last_saved_step = self.step
        if self.pending is not None:
            log.info(f"staged checkpoint {path} in {self.last_save_seconds:.1f} s; writing it while training goes on")
        else:
            self._saved(path, self.last_save_seconds)

    def finish_pending_save(self, wait: bool) -> None:
        """Complete the save being written, if every rank has written its files (``wait``: after
        this rank's thread is done). A collective while a save is pending; nothing otherwise."""
        if self.pending is None:
            return
        timeout = 60 * self.cfg.checkpoint.save_timeout_minutes
        if wait:
            self.watchdog.progress(
                f"writing checkpoint {self.pending.path}", timeout, "checkpoint.save_timeout_minutes"
            )
            self.stop.saving = self.pending.path
        try:
            pending, rank = self.pending, self.session.dist_env.rank
            if async_checkpoint.finish(pending, self.session.ckpt_root, rank, wait, timeout):
                self.pending = None
                self._saved(pending.path, time.perf_counter() - pending.started, staged=True)
        finally:
            if wait:
                self.stop.saving = None
                self.watchdog.progress(f"training step {self.step + 1}")

    def _saved(self, path: Path, seconds: float, staged: bool = False) -> None:
        """A checkpoint is complete, ``seconds`` after its save began (``staged``: written while
        training went on, which stood still only for the staging): prune the older ones, move
        ``best``, say so, and add its row to the metrics."""
        s = self.session
        if distributed.is_rank0():
            for old in checkpoint.prune(s.ckpt_root, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_best):
                log.info(f"removed old checkpoint {old.name}")
            checkpoint.update_best(s.ckpt_root)
        log.info(f"saved checkpoint {path}" + (f" ({seconds:.1f} s after its save began)" if staged else ""))
        row = {"checkpoint_step": checkpoints.step_of(path), "checkpoint_stall_s": self.last_save_seconds}
        self._emit(row | {"checkpoint_s": seconds})

    def print_sample(self) -> None:
        s = self.session
        self.watchdog.progress(f"sampling at step {self.step}")
        self.model_engine.eval()
        text = sample_text(self.model_engine.module, self.sample, s.data, self.cfg, s.device)
        self.model_engine.train()
        if text is not None:
            log.info(f"sample at step {self.step}: {text}")

    def close(self) -> None:
        self.session.close()
