"""torch.profiler over a few training steps, for finding where a step's time goes.

Each rank writes to ``profile/`` in the run directory (``rank<N>-trace.json.gz``,
``rank<N>-ops.txt``): a Chrome trace (open it in
https://ui.perfetto.dev or chrome://tracing) and a table of the operations that took the most
time. Rank 0 logs how busy the GPU was over the profiled steps: the time its kernels ran over
the wall time. What is missing to 100% is time the GPU waited for the host (Python, launches,
synchronisations) or for data. The profiler's own tracing slows the host, so that figure is a
lower bound, and the training log's step times over the profiled steps include that cost.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from dist_lm.observe import log


class StepProfiler:
    """Profiles optimizer steps ``first`` .. ``first + count - 1`` (counted as the run counts
    them, from 1); does nothing when ``first`` is 0."""

    def __init__(self, first: int, count: int, out_dir: Path | None, name: str, device: torch.device):
        """Writes ``out_dir/<name>-trace.json.gz`` and ``out_dir/<name>-ops.txt``."""
        self.first, self.last = first, first + count - 1
        self.out_dir, self.name, self.device = out_dir, name, device
        self._profile: profile | None = None
        self._start = 0.0

    def before_step(self, step: int) -> None:
        """Call with the number the coming step will have."""
        if self.first and step == self.first:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._profile = profile(activities=activities)
            self._profile.__enter__()
            self._sync()
            self._start = time.perf_counter()

    def after_step(self, step: int) -> None:
        """Call with the number of the step just done."""
        if self._profile is None or step != self.last:
            return
        self._sync()
        wall = time.perf_counter() - self._start
        self._profile.__exit__(None, None, None)
        self._write(self._profile, wall, f"steps {self.first}-{self.last}")
        self._profile = None

    def _write(self, prof: profile, wall_s: float, what: str) -> None:
        """The trace and the table of ``prof`` (which covered ``wall_s`` seconds of ``what``)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.out_dir / f"{self.name}-trace.json.gz"))
        gpu = self.device.type == "cuda"
        averages = prof.key_averages()
        table = averages.table(sort_by="self_device_time_total" if gpu else "self_cpu_time_total", row_limit=30)
        summary = f"{what}: {wall_s * 1000:.1f} ms of wall time"
        if gpu:
            busy_s = busy_seconds(prof.events())
            summary += f"; the GPU was busy {busy_s * 1000:.1f} ms of it ({100 * busy_s / wall_s:.1f}%)"
        (self.out_dir / f"{self.name}-ops.txt").write_text(summary + "\n\n" + table + "\n")
        log.info(f"profile of {summary}; trace and table in {self.out_dir}")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def busy_seconds(events) -> float:
    """How long at least one kernel (or copy) ran on the GPU: the union of their time ranges,
    so that kernels of concurrent streams are counted once. (The table's "Self CUDA" column
    cannot be summed for this: it gives a kernel's time both to its own row and to the
    operation that launched it.)"""
    spans = [(e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA]
    return busy_and_idle(spans)[0] / 1e6  # the profiler's times are in microseconds


def busy_and_idle(spans: list[tuple[float, float]], min_gap: float = 0.0) -> tuple[float, list[tuple[float, float]]]:
    """The time covered by ``spans`` (start, end), overlaps counted once, and the gaps between
    them of at least ``min_gap``, in order (tools/trace_gaps.py: where the GPU sat idle)."""
    busy, gaps = 0.0, []
    start = end = None  # the run of overlapping spans being merged
    for span_start, span_end in sorted(spans):
        if end is None:
            start, end = span_start, span_end
        elif span_start > end:
            busy += end - start
            if span_start - end >= min_gap:
                gaps.append((end, span_start))
            start, end = span_start, span_end
        else:
            end = max(end, span_end)
    return busy + (0.0 if end is None else end - start), gaps
