"""Rank-0 output and metrics: the one place that decides which rank speaks.

``log`` prints on rank 0 and appends to the run's log file; ``MetricsWriter`` appends one JSON
object per logged step to metrics.jsonl. Other ranks stay silent.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import TextIO

from dist_lm.distributed import is_rank0

_log_file: TextIO | None = None


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
    """Appends metrics records to metrics.jsonl on rank 0."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "a", buffering=1) if is_rank0() else None

    def write(self, record: dict) -> None:
        if self._file is not None:
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
            self._file.write(json.dumps(clean) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def throughput(tokens: int, seconds: float, flops_per_token: float, world_size: int,
               peak_flops: float | None) -> tuple[float, float | None]:
    """tokens/s over all ranks, and model FLOPs utilisation (None when the peak is unknown)."""
    tokens_per_s = tokens / seconds if seconds > 0 else 0.0
    if peak_flops is None:
        return tokens_per_s, None
    return tokens_per_s, tokens_per_s * flops_per_token / (peak_flops * world_size)


def format_step(r: dict) -> str:
    parts = [f"step {r['step']:>6}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}"]
    if r.get("grad_norm") is not None:
        parts.append(f"gnorm {r['grad_norm']:.3f}")
    parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.3g}%")  # 3 significant digits: tiny models are far below 1%
    parts.append(f"{1000 * r['step_time']:.0f} ms/step")
    if r.get("peak_mem_gb") is not None:
        parts.append(f"mem {r['peak_mem_gb']:.2f} GB")
    return " | ".join(parts)
