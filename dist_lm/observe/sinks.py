"""Where metrics rows go: metrics.jsonl and metrics.csv always; wandb and TensorBoard when asked.

Each sink takes rows (dicts with a "step") and is created on rank 0 only, by
:class:`dist_lm.observe.metrics.MetricsWriter`. Also each rank's log of the samples it read
(data.log_samples).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import netrc
import os
import secrets
from pathlib import Path
from typing import Callable, Protocol

from dist_lm.config.schema import ConfigError, LoggingConfig
from dist_lm.files import AppendFile, write_atomic

# The columns of metrics.csv, in order; a row leaves empty what it does not have (val_loss is
# there only on evaluation steps, the training figures only on logging steps, the checkpoint_
# figures only in the row a completed save adds: the step it saved, how long training stood
# still for it, and how long it took until complete).
COLUMNS = [
    "step",
    "tokens",
    "loss",
    "val_loss",
    "val_ppl",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "mfu",
    "step_time",
    "peak_mem_gb",
    "elapsed_s",
    "aux_loss",
    "z_loss",
    "checkpoint_step",
    "checkpoint_stall_s",
    "checkpoint_s",
]


def _finite(v: object) -> object:
    return None if isinstance(v, float) and not math.isfinite(v) else v


class Sink(Protocol):
    def write(self, row: dict) -> None: ...
    def close(self) -> None: ...


def drop_lines_after(path: Path, step: int, step_of: Callable[[str], int], header_lines: int = 0) -> int:
    """Rewrite ``path`` (under a temporary name, then renamed) without its lines of steps past
    ``step``, and without a last line cut short (a process killed while writing it).
    Returns the number of lines removed."""

    def keep(line: str) -> bool:
        try:
            return line.endswith("\n") and step_of(line) <= step
        except ValueError:  # a torn line (json.JSONDecodeError is a ValueError)
            return False

    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    rows = lines[header_lines:]
    kept = [line for line in rows if keep(line)]
    if len(kept) < len(rows):
        write_atomic(path, "".join(lines[:header_lines] + kept))
    return len(rows) - len(kept)


def drop_rows_after(run_dir: Path, step: int) -> int:
    """Remove the rows of metrics.jsonl and metrics.csv past ``step``. A run resumed from its
    checkpoint at ``step`` trains the steps after it again: the files should then hold each step
    once, from the run that went on. Returns the number of rows removed (the two files hold the
    same rows)."""
    return max(
        drop_lines_after(run_dir / "metrics.jsonl", step, lambda line: json.loads(line)["step"]),
        drop_lines_after(run_dir / "metrics.csv", step, lambda line: int(line.split(",", 1)[0]), 1),
    )


class SampleLog:
    """data.log_samples: the window ids one rank read, a line ``STEP: ID ID ...`` per optimizer
    step, in RUN_DIR/samples/rank<N>.txt. Every rank writes its own file.

    A run that starts at step S (its checkpoint's, or 0) first drops the lines of later steps,
    written by an earlier process in the run directory (they are trained again), so each file
    holds each step once. Rank 0 also trims the files of ranks this run does not have."""

    def __init__(self, run_dir: Path, rank: int, world_size: int, start_step: int):
        folder = run_dir / "samples"
        folder.mkdir(exist_ok=True)
        self.path = folder / f"rank{rank}.txt"
        others = (
            []
            if rank
            else [p for p in folder.glob("rank*.txt") if p.stem[4:].isdigit() and int(p.stem[4:]) >= world_size]
        )
        for path in [self.path, *others]:
            drop_lines_after(path, start_step, lambda line: int(line.split(":", 1)[0]))
        self._file = AppendFile(self.path)
        self.failure: str | None = None

    def write(self, step: int, ids) -> None:
        """One step's ids; a failure (a full disk) is recorded in ``failure``, and nothing more
        is written (the trainer then ends the run)."""
        if self.failure is not None:
            return
        try:
            self._file.write(f"{step}: {' '.join(map(str, ids))}\n")
        except OSError as e:
            self.failure = f"writing {e.filename} failed ({e.strerror or e})"

    def close(self) -> None:
        self._file.close()


def read_sample_log(path: Path) -> dict[int, list[int]]:
    """A samples/rank<N>.txt file as {step: window ids}."""
    lines = (line.split(":", 1) for line in path.read_text().splitlines())
    return {int(step): [int(i) for i in ids.split()] for step, ids in lines}


class JsonlSink:
    """metrics.jsonl: a row a line, whole lines only (dist_lm.files.AppendFile), even on a full disk."""

    def __init__(self, path: Path):
        self._file = AppendFile(path)

    def write(self, row: dict) -> None:
        self._file.write(json.dumps({k: _finite(v) for k, v in row.items()}) + "\n")

    def close(self) -> None:
        self._file.close()


class CsvSink:
    """metrics.csv: the same rows, whole lines only."""

    def __init__(self, path: Path, extra_columns: list[str] = ()):
        """``extra_columns``: beyond COLUMNS, e.g. a mixture's val_loss_NAME per source."""
        self.columns = [*COLUMNS, *extra_columns]
        header = self._line(dict(zip(self.columns, self.columns)), header=True)
        fresh = not path.exists() or path.stat().st_size == 0
        if not fresh:
            with open(path) as f:
                first = f.readline()
            if first != header:  # a version with other columns wrote it: its rows, under this header
                with open(path, newline="") as f:
                    rows = [{k: v for k, v in r.items() if k in self.columns} for r in csv.DictReader(f)]
                write_atomic(path, header + "".join(self._line(r) for r in rows))
        self._file = AppendFile(path)
        if fresh:
            self._file.write(header)

    def _line(self, row: dict, header: bool = False) -> str:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.columns)
        writer.writerow(row if header else {k: ("" if _finite(v) is None else v) for k, v in row.items()})
        return text.getvalue()

    def write(self, row: dict) -> None:
        unknown = [k for k in row if k not in self.columns]
        if unknown:  # a metric added to the trainer but not here would be missing from the CSV unseen
            raise ValueError(
                f"metrics.csv has no column for {', '.join(unknown)}: add it to dist_lm.observe.sinks.COLUMNS"
            )
        self._file.write(self._line(row))

    def close(self) -> None:
        self._file.close()


def wandb_mode(setting: str) -> tuple[str, str | None]:
    """(mode, a note to print once) for logging.wandb."""
    if setting != "auto":
        return setting, None
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], None
    if os.environ.get("WANDB_API_KEY") or _netrc_has_wandb():
        return "online", None
    return "offline", "no wandb API key configured: logging offline"


def _netrc_has_wandb() -> bool:
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


# How long wandb may take to start a run online (its default, 90 s, is what a run without network
# waited before failing). WANDB_INIT_TIMEOUT, wandb's own variable, overrides it.
WANDB_INIT_TIMEOUT_S = 30.0


class WandbSink:
    """One wandb run per run directory: its id is kept in RUN_DIR/wandb-run-id, so a resumed
    run continues the same wandb run. Files go under RUN_DIR/wandb.

    Online, a bad key or no network makes ``wandb.init`` fail (within WANDB_INIT_TIMEOUT_S): under
    logging.wandb=auto the run logs offline instead, with one warning (``self.fallback``); when
    online was asked for explicitly, it is a ConfigError."""

    def __init__(self, cfg: LoggingConfig, mode: str, run_dir: Path, run_name: str, config: dict):
        os.environ.setdefault("WANDB_SILENT", "true")  # its login line too, which comes before our settings do
        import wandb

        id_file = run_dir / "wandb-run-id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)  # wandb ids: [a-z0-9]
        write_atomic(id_file, run_id)

        def start(mode: str):
            return wandb.init(
                project=cfg.wandb_project,
                entity=cfg.wandb_entity,
                group=cfg.wandb_group,
                tags=cfg.wandb_tags,
                name=run_name,
                id=run_id,
                resume="allow",
                dir=str(run_dir),
                mode=mode,
                config=config,
                # console="off": our log already has the console output, and wandb need not copy it.
                settings=wandb.Settings(
                    silent=True,
                    console="off",
                    init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", WANDB_INIT_TIMEOUT_S)),
                ),
            )

        self.fallback: str | None = None
        try:
            self.run = start(mode)
        except wandb.errors.Error as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            wandb.teardown()  # the failed run holds its id in wandb's service until then
            # wandb's own error reports go to the same server, and would add a line each at exit
            logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
            if mode != "online" or cfg.wandb != "auto":
                raise ConfigError(
                    "logging.wandb",
                    f"is {cfg.wandb} but wandb could not start ({why}); check "
                    "WANDB_API_KEY (or wandb login) and the network, or set logging.wandb=offline "
                    "or auto",
                ) from None
            self.fallback = f"could not start online ({why}): logging offline"
            mode = "offline"
            self.run = start(mode)
        self.offline_dir = Path(self.run.dir).parent if mode == "offline" else None

    def write(self, row: dict) -> None:
        self.run.log({k: v for k, v in row.items() if k != "step" and _finite(v) is not None}, step=row["step"])

    def alert(self, title: str, text: str) -> None:
        self.run.alert(title=title, text=text)

    def close(self) -> None:
        self.run.finish()


def require_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError("logging.tensorboard", "needs the tensorboard package: pip install tensorboard") from None


class TensorBoardSink:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, row: dict) -> None:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and _finite(value) is not None:
                self._writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self._writer.close()
