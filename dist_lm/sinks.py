"""Where metrics rows go: metrics.jsonl and metrics.csv always; wandb and TensorBoard when asked.

Each sink takes rows (dicts with a "step") and is created on rank 0 only, by
:class:`dist_lm.metrics.MetricsWriter`.
"""

from __future__ import annotations

import csv
import json
import math
import netrc
import os
import secrets
from pathlib import Path
from typing import Protocol

from dist_lm.config import ConfigError, LoggingConfig

# The columns of metrics.csv, in order; a row leaves empty what it does not have (val_loss is
# there only on evaluation steps, the training figures only on logging steps).
COLUMNS = ["step", "tokens", "loss", "val_loss", "val_ppl", "lr", "grad_norm", "tokens_per_s", "mfu",
           "step_time", "peak_mem_gb", "elapsed_s", "aux_loss"]


def _finite(v: object) -> object:
    return None if isinstance(v, float) and not math.isfinite(v) else v


class Sink(Protocol):
    def write(self, row: dict) -> None: ...
    def close(self) -> None: ...


def drop_rows_after(run_dir: Path, step: int) -> int:
    """Remove the rows of metrics.jsonl and metrics.csv past ``step`` (each file rewritten under a
    temporary name, then renamed). A run resumed from its checkpoint at ``step`` trains the steps
    after it again: the files should then hold each step once, from the run that went on.
    A last line cut short (a process killed while writing it) is removed too.
    Returns the number of rows removed (the two files hold the same rows)."""
    def keep(line: str, step_of) -> bool:
        try:
            return line.endswith("\n") and step_of(line) <= step
        except ValueError:  # a torn line (json.JSONDecodeError is a ValueError)
            return False

    removed = 0
    for name, header_lines, step_of in (("metrics.jsonl", 0, lambda line: json.loads(line)["step"]),
                                        ("metrics.csv", 1, lambda line: int(line.split(",", 1)[0]))):
        path = run_dir / name
        if not path.is_file():
            continue
        lines = path.read_text().splitlines(keepends=True)
        rows = lines[header_lines:]
        kept = [line for line in rows if keep(line, step_of)]
        if len(kept) < len(rows):
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_text("".join(lines[:header_lines] + kept))
            os.replace(tmp, path)
        removed = max(removed, len(rows) - len(kept))
    return removed


class JsonlSink:
    def __init__(self, path: Path):
        self._file = open(path, "a", buffering=1)

    def write(self, row: dict) -> None:
        self._file.write(json.dumps({k: _finite(v) for k, v in row.items()}) + "\n")

    def close(self) -> None:
        self._file.close()


class CsvSink:
    def __init__(self, path: Path):
        fresh = not path.exists() or path.stat().st_size == 0
        self._file = open(path, "a", newline="", buffering=1)
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS, extrasaction="ignore")
        if fresh:
            self._writer.writeheader()

    def write(self, row: dict) -> None:
        self._writer.writerow({k: ("" if _finite(v) is None else v) for k, v in row.items()})

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


class WandbSink:
    """One wandb run per run directory: its id is kept in RUN_DIR/wandb-run-id, so a resumed
    run continues the same wandb run. Files go under RUN_DIR/wandb."""

    def __init__(self, cfg: LoggingConfig, mode: str, run_dir: Path, run_name: str, config: dict):
        import wandb

        id_file = run_dir / "wandb-run-id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)  # wandb ids: [a-z0-9]
        tmp = id_file.with_name(".wandb-run-id.tmp")
        tmp.write_text(run_id)
        os.replace(tmp, id_file)
        self.run = wandb.init(
            project=cfg.wandb_project, entity=cfg.wandb_entity, group=cfg.wandb_group, tags=cfg.wandb_tags,
            name=run_name, id=run_id, resume="allow", dir=str(run_dir), mode=mode, config=config,
            # console="off": our log already has the console output, and wandb need not copy it.
            settings=wandb.Settings(silent=True, console="off"))
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
