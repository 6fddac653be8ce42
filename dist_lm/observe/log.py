"""Rank-0 output: the one place that decides which rank speaks. ``info`` prints on rank 0 and
appends to the run's log file, ``warn`` does so on stderr, ``Progress`` is the console's progress
bar, above which both print. Other ranks stay silent."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from dist_lm.files import AppendFile
from dist_lm.runtime.distributed import is_rank0

_log_file: AppendFile | None = None
_bar = None  # the progress bar while one is shown
_write_failure: str | None = None


def set_log_file(path: Path | None) -> None:
    """Also append rank 0's messages to ``path`` (the run directory's train.log)."""
    global _log_file, _write_failure
    if _log_file is not None:
        _log_file.close()
    _log_file = AppendFile(path) if path is not None and is_rank0() else None
    _write_failure = None


def write_failure() -> str | None:
    """Why the log file could not be written (a full disk), or None; it is not written after that."""
    return _write_failure


def _to_file(line: str) -> None:
    global _log_file, _write_failure
    if _log_file is None:
        return
    try:
        _log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
    except OSError as e:  # the console still has every message; the loop ends the run (Trainer)
        _write_failure = f"writing {_log_file.path} failed ({e.strerror or e})"
        _log_file.close()
        _log_file = None


def info(message: str) -> None:
    """Print a line on rank 0 (and into the run log)."""
    if not is_rank0():
        return
    if _bar is not None:
        _bar.write(message, file=sys.stdout)
    else:
        print(message, file=sys.stdout, flush=True)
    _to_file(message)


def warn(message: str) -> None:
    """A warning from rank 0, on stderr so it is never lost among the metrics."""
    if is_rank0():
        print(f"warning: {message}", file=sys.stderr, flush=True)
        _to_file(f"warning: {message}")


class Progress:
    """A progress bar on rank 0 when stderr is a terminal (steps, ETA, loss, tokens/s, MFU).
    While it is shown, :func:`info` prints above it."""

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
