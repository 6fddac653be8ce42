"""Checkpoints through DeepSpeed's engine, with our resumable state as explicit client state.

Layout: RUN_DIR/checkpoints/step00000100/ (DeepSpeed's files, sharded per rank as ZeRO makes
them, and our state as state.json, written first) and RUN_DIR/checkpoints/latest (the tag of
the newest, written by DeepSpeed after its save). Our state is plain JSON, so it can be read
before the engine exists, e.g. to refuse a resume on other data before loading any tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dist_lm.config import UserError

Engine = Any  # a deepspeed.DeepSpeedEngine; only its methods are used here


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def latest_tag(run_dir: Path) -> str | None:
    latest = checkpoint_dir(run_dir) / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def save(engine: Engine, run_dir: Path, step: int, state: dict, is_rank0: bool) -> Path:
    """Save on every rank (a collective): our JSON state first, then the engine's, then `latest`."""
    path = checkpoint_dir(run_dir) / tag_for(step)
    if is_rank0:
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / ".state.json.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, path / "state.json")
    engine.save_checkpoint(str(checkpoint_dir(run_dir)), tag=tag_for(step))
    return path


def read_state(run_dir: Path) -> dict | None:
    """Our state of the newest checkpoint of the run, or None if it has none."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    path = checkpoint_dir(run_dir) / tag / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"checkpoint error: {path} is missing or unreadable; remove {checkpoint_dir(run_dir) / tag} "
                        f"and point {checkpoint_dir(run_dir) / 'latest'} at an earlier step, or set checkpoint.resume=false") from None


def load(engine: Engine, run_dir: Path) -> None:
    """Load the newest checkpoint of the run into the engine."""
    tag = latest_tag(run_dir)
    path, _ = engine.load_checkpoint(str(checkpoint_dir(run_dir)), tag=tag)
    if path is None:
        raise UserError(f"checkpoint error: {checkpoint_dir(run_dir) / tag} could not be loaded; "
                        f"remove it (and fix {checkpoint_dir(run_dir) / 'latest'}) or set checkpoint.resume=false")
