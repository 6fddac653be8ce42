"""Rank-0 output and metrics: the one place that decides which rank speaks.

``log`` prints on rank 0 and appends to the run's log file; ``MetricsWriter`` sends each
metrics row to the sinks (dist_lm.observe.sinks); ``Progress`` is the console's progress bar;
``LogWindow`` holds the steps since the last row; ``RunSummary`` is RUN_DIR/run.json, what a
process set up, for tools to read instead of the log. Other ranks stay silent.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TextIO

import torch

from dist_lm.observe import sinks
from dist_lm.config.schema import LoggingConfig
from dist_lm.runtime.distributed import all_gather_floats, is_rank0
from dist_lm.files import write_atomic

_log_file: TextIO | None = None
_bar = None  # the progress bar while one is shown


def set_log_file(path: Path | None) -> None:
    """Also append rank 0's messages to ``path`` (the run directory's train.log)."""
    global _log_file
    if _log_file is not None:
        _log_file.close()
    _log_file = open(path, "a", buffering=1) if path is not None and is_rank0() else None


def log(message: str) -> None:
    """Print a line on rank 0 (and into the run log)."""
    if not is_rank0():
        return
    if _bar is not None:
        _bar.write(message, file=sys.stdout)
    else:
        print(message, file=sys.stdout, flush=True)
    if _log_file is not None:
        _log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


def warn(message: str) -> None:
    """A warning from rank 0, on stderr so it is never lost among the metrics."""
    if is_rank0():
        print(f"warning: {message}", file=sys.stderr, flush=True)
        if _log_file is not None:
            _log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} warning: {message}\n")


class MetricsWriter:
    """Every metrics row to every sink, on rank 0: metrics.jsonl and metrics.csv always,
    wandb and TensorBoard as configured. Other ranks hold no sinks."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, run_name: str, config: dict, start_step: int = 0):
        """``start_step``: the step the run continues from (its checkpoint's, or 0). Rows of later
        steps, logged by an earlier process in this run directory, are removed from the files."""
        self.sinks: list[sinks.Sink] = []
        self.wandb: sinks.WandbSink | None = None
        if not is_rank0():
            return
        if removed := sinks.drop_rows_after(run_dir, start_step):
            log(f"metrics: {removed} row(s) after step {start_step}, from the process that stopped there, "
                "removed from metrics.jsonl and metrics.csv (those steps are trained again)")
        self.sinks += [sinks.JsonlSink(run_dir / "metrics.jsonl"), sinks.CsvSink(run_dir / "metrics.csv")]
        mode, note = sinks.wandb_mode(cfg.wandb)
        if mode != "disabled":
            self.wandb = sinks.WandbSink(cfg, mode, run_dir, run_name, config)
            self.sinks.append(self.wandb)
            if self.wandb.fallback:
                warn(f"wandb: {self.wandb.fallback} to {self.wandb.offline_dir}; upload later with: "
                     f"wandb sync {self.wandb.offline_dir}")
            elif note:
                log(f"wandb: {note} to {self.wandb.offline_dir}; upload later with: wandb sync {self.wandb.offline_dir}")
        if cfg.tensorboard:
            self.sinks.append(sinks.TensorBoardSink(run_dir / "tensorboard"))

    @property
    def wandb_run_id(self) -> str | None:
        return self.wandb.run.id if self.wandb is not None else None

    def write(self, row: dict) -> None:
        for sink in self.sinks:
            sink.write(row)

    def alert(self, title: str, text: str) -> None:
        """A warning on the console, and a wandb alert when wandb is on."""
        warn(f"{title}: {text}")
        if self.wandb is not None:
            self.wandb.alert(title, text)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


class Progress:
    """A progress bar on rank 0 when stderr is a terminal (steps, ETA, loss, tokens/s, MFU).
    While it is shown, :func:`log` prints above it."""

    def __init__(self, enabled: bool, total: int, initial: int):
        global _bar
        self.bar = None
        if enabled and is_rank0():
            from tqdm import tqdm

            # disable=None: tqdm turns itself off when stderr is not a terminal (CI, log files).
            self.bar = tqdm(total=total, initial=initial, disable=None, unit="step", dynamic_ncols=True)
            _bar = self.bar

    def update(self, row: dict | None) -> None:
        if self.bar is None:
            return
        if row and "loss" in row:
            mfu = f" mfu {100 * row['mfu']:.3g}%" if row.get("mfu") is not None else ""
            self.bar.set_postfix_str(f"loss {row['loss']:.4f} {row['tokens_per_s']:,.0f} tok/s{mfu}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        global _bar
        if self.bar is not None:
            self.bar.close()
            _bar = None


RUN_SUMMARY = "run.json"


@dataclass
class RunSummary:
    """What the newest process of a run set up, and how soon it trained: RUN_DIR/run.json, written
    by rank 0 (atomically) at start-up and again after its first step. Tools (tools/bench.py) read
    it rather than the log's wording. ``version`` goes up when a field's meaning changes."""
    version: int = 1
    launcher: str = ""
    world_size: int = 1
    precision: str = ""
    zero_stage: int = 0
    global_batch_size: int = 0
    micro_batch_size: int = 0
    grad_accum_steps: int = 0
    parameters: int = 0
    flops_per_token: float = 0.0
    predicted_peak_mem_gb: float | None = None  # GPU runs: dist_lm.plan.memory's estimate per rank
    start_step: int = 0  # the step this process started from (its checkpoint's, or 0)
    first_step_s: float | None = None  # from the trainer's start to the end of this process's first step

    def write(self, run_dir: Path) -> None:
        if not is_rank0():
            return
        write_atomic(run_dir / RUN_SUMMARY, json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, run_dir: Path) -> "RunSummary":
        data = json.loads((run_dir / RUN_SUMMARY).read_text())
        if data.get("version") != cls.version:
            raise ValueError(f"{run_dir / RUN_SUMMARY} is version {data.get('version')}; this code reads {cls.version}")
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


class LogWindow:
    """The steps since the last metrics row: this rank's losses (and MoE load-balancing losses)
    summed on device, read only at a log step (reading is a host-device sync), and how many steps.

    A checkpoint keeps the sums of every rank and the count (``state_dict``), so the first row
    after a resume in the middle of a window averages the same steps, with the same sums, as an
    uninterrupted run's row. Throughput counts only this process's steps (``timed_steps`` since
    ``start``): the earlier ones' time is not known here."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.aux_sum = torch.zeros((), device=device)
        self.steps = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.timed_steps, self.start = 0, time.perf_counter()

    def add_step(self) -> None:
        self.steps += 1
        self.timed_steps += 1

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.aux_sum.zero_()
        self.steps = 0
        self.restart_clock()

    def state_dict(self) -> dict:
        """Every rank's sums (a collective: every rank calls it)."""
        sums = all_gather_floats([self.loss_sum.item(), self.aux_sum.item()])
        return {"steps": self.steps, "loss_sums": [s[0] for s in sums], "aux_sums": [s[1] for s in sums]}

    def load_state_dict(self, state: dict, rank: int, world_size: int) -> None:
        """On the world size it was saved at, each rank takes its own sums back (the row is then
        bitwise the same); on another, rank 0 takes their totals (the same to rounding)."""
        self.steps = state["steps"]
        same = len(state["loss_sums"]) == world_size
        for tensor, sums in ((self.loss_sum, state["loss_sums"]), (self.aux_sum, state["aux_sums"])):
            tensor.fill_(sums[rank] if same else (sum(sums) if rank == 0 else 0.0))


def throughput(tokens: int, seconds: float, flops_per_token: float, world_size: int,
               peak_flops: float | None) -> tuple[float, float | None]:
    """tokens/s over all ranks, and model FLOPs utilisation (None when the peak is unknown)."""
    tokens_per_s = tokens / seconds if seconds > 0 else 0.0
    if peak_flops is None:
        return tokens_per_s, None
    return tokens_per_s, tokens_per_s * flops_per_token / (peak_flops * world_size)


def format_step(r: dict) -> str:
    parts = [f"step {r['step']:>6}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}"]
    if r.get("aux_loss") is not None:
        parts.append(f"aux {r['aux_loss']:.4f}")
    if r.get("grad_norm") is not None:
        parts.append(f"gnorm {r['grad_norm']:.3f}")
    parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.3g}%")  # 3 significant digits: tiny models are far below 1%
    parts.append(f"{1000 * r['step_time']:.0f} ms/step")
    if r.get("peak_mem_gb") is not None:
        parts.append(f"mem {r['peak_mem_gb']:.2f} GB")
    return " | ".join(parts)
