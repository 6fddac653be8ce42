"""Metrics: ``MetricsWriter`` sends each row to the sinks (dist_lm.observe.sinks) on rank 0;
``LogWindow`` holds the steps since the last row; ``RunSummary`` is RUN_DIR/run.json, what a
process set up, for tools to read instead of the log. (Rank-0 text output: dist_lm.observe.log.)
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

from dist_lm.config.schema import LoggingConfig
from dist_lm.files import write_atomic
from dist_lm.observe import log, sinks
from dist_lm.runtime.distributed import all_gather_floats, is_rank0


class MetricsWriter:
    """Every metrics row to every sink, on rank 0: metrics.jsonl and metrics.csv always,
    wandb and TensorBoard as configured. Other ranks hold no sinks."""

    def __init__(
        self,
        run_dir: Path,
        cfg: LoggingConfig,
        run_name: str,
        config: dict,
        start_step: int = 0,
        extra_columns: list[str] = (),
    ):
        """``start_step``: the step the run continues from (its checkpoint's, or 0). Rows of later
        steps, logged by an earlier process in this run directory, are removed from the files."""
        self.sinks: list[sinks.Sink] = []
        self.failure: str | None = None
        self.wandb: sinks.WandbSink | None = None
        if not is_rank0():
            return
        if removed := sinks.drop_rows_after(run_dir, start_step):
            log.info(
                f"metrics: {removed} row(s) after step {start_step}, from the process that stopped there, "
                "removed from metrics.jsonl and metrics.csv (those steps are trained again)"
            )
        self.sinks += [
            sinks.JsonlSink(run_dir / "metrics.jsonl"),
            sinks.CsvSink(run_dir / "metrics.csv", extra_columns),
        ]
        mode, note = sinks.wandb_mode(cfg.wandb)
        if mode != "disabled":
            self.wandb = sinks.WandbSink(cfg, mode, run_dir, run_name, config)
            self.sinks.append(self.wandb)
            if self.wandb.fallback:
                log.warn(
                    f"wandb: {self.wandb.fallback} to {self.wandb.offline_dir}; upload later with: "
                    f"wandb sync {self.wandb.offline_dir}"
                )
            elif note:
                log.info(
                    f"wandb: {note} to {self.wandb.offline_dir}; upload later with: wandb sync {self.wandb.offline_dir}"
                )
        if cfg.tensorboard:
            self.sinks.append(sinks.TensorBoardSink(run_dir / "tensorboard"))

    @property
    def wandb_run_id(self) -> str | None:
        return self.wandb.run.id if self.wandb is not None else None

    def write(self, row: dict) -> None:
        """The row to every sink; a sink that cannot write (a full disk) is recorded in
        ``failure``, and nothing is written after it (the trainer then ends the run)."""
        if self.failure is not None:
            return
        for sink in self.sinks:
            try:
                sink.write(row)
            except OSError as e:
                self.failure = f"writing {e.filename} failed ({e.strerror or e})"
                return

    def alert(self, title: str, text: str) -> None:
        """A warning on the console, and a wandb alert when wandb is on."""
        log.warn(f"{title}: {text}")
        if self.wandb is not None:
            self.wandb.alert(title, text)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


RUN_SUMMARY = "run.json"


@dataclass
class RunSummary:
    """What the newest process of a run set up, and how soon it trained: RUN_DIR/run.json, written
    by rank 0 (atomically) at start-up and again after its first step. Tools (dist-lm bench) read
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
    sequence_parallel_size: int = 1  # ranks that split each window (dist_lm.config.layout)
    tensor_parallel_size: int = 1  # ranks that split each block's linear layers
    init_from: str | None = None  # the Hugging Face model directory the run started from (model.init_from)

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
        self.z_sum = torch.zeros((), device=device)
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
        self.z_sum.zero_()
        self.steps = 0
        self.restart_clock()

    def means(self, micro_batches: int, aux: bool, z: bool) -> tuple[float, float | None, float | None]:
        """The window's mean loss (and MoE load-balancing and z-loss, when asked) over
        ``micro_batches``, every micro-batch of every rank: all-reduces of the sums, in place (the
        window is reset after its row), a host-device sync point each, which is why they happen only
        every log_interval steps. A collective."""
        means = []
        for total, wanted in ((self.loss_sum, True), (self.aux_sum, aux), (self.z_sum, z)):
            if wanted:
                dist.all_reduce(total)
            means.append(total.item() / micro_batches if wanted else None)
        return means[0], means[1], means[2]

    def state_dict(self) -> dict:
        """Every rank's sums (a collective: every rank calls it)."""
        sums = all_gather_floats([self.loss_sum.item(), self.aux_sum.item(), self.z_sum.item()])
        return {
            "steps": self.steps,
            "loss_sums": [s[0] for s in sums],
            "aux_sums": [s[1] for s in sums],
            "z_sums": [s[2] for s in sums],
        }

    def load_state_dict(self, state: dict, rank: int, world_size: int) -> None:
        """On the world size it was saved at, each rank takes its own sums back (the row is then
        bitwise the same); on another, rank 0 takes their totals (the same to rounding)."""
        self.steps = state["steps"]
        same = len(state["loss_sums"]) == world_size
        zeros = [0.0] * len(state["loss_sums"])  # (checkpoints from before the z-loss have no z_sums)
        for tensor, sums in (
            (self.loss_sum, state["loss_sums"]),
            (self.aux_sum, state["aux_sums"]),
            (self.z_sum, state.get("z_sums", zeros)),
        ):
            tensor.fill_(sums[rank] if same else (sum(sums) if rank == 0 else 0.0))


def throughput(
    tokens: int, seconds: float, flops_per_token: float, world_size: int, peak_flops: float | None
) -> tuple[float, float | None]:
    """tokens/s over all ranks, and model FLOPs utilisation (None when the peak is unknown)."""
    tokens_per_s = tokens / seconds if seconds > 0 else 0.0
    if peak_flops is None:
        return tokens_per_s, None
    return tokens_per_s, tokens_per_s * flops_per_token / (peak_flops * world_size)


def format_step(r: dict) -> str:
    parts = [f"step {r['step']:>6}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}"]
    if r.get("aux_loss") is not None:
        parts.append(f"aux {r['aux_loss']:.4f}")
    if r.get("z_loss") is not None:
        parts.append(f"z {r['z_loss']:.2e}")
    if r.get("grad_norm") is not None:
        parts.append(f"gnorm {r['grad_norm']:.3f}")
    parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.3g}%")  # 3 significant digits: tiny models are far below 1%
    parts.append(f"{1000 * r['step_time']:.0f} ms/step")
    if r.get("peak_mem_gb") is not None:
        parts.append(f"mem {r['peak_mem_gb']:.2f} GB")
    return " | ".join(parts)


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated on this rank; on CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB
