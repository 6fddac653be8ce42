"""Checkpoints through DeepSpeed's engine, with our resumable state as explicit client state.

Layout: RUN_DIR/checkpoints/step00000100/ (DeepSpeed's files, sharded per rank as ZeRO makes
them) and RUN_DIR/checkpoints/latest (the tag of the newest, written by DeepSpeed after the save).
"""

from __future__ import annotations

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


def save(engine: Engine, run_dir: Path, step: int, client_state: dict) -> Path:
    """Save on every rank (a collective). client_state holds plain values only."""
    engine.save_checkpoint(str(checkpoint_dir(run_dir)), tag=tag_for(step), client_state=client_state)
    return checkpoint_dir(run_dir) / tag_for(step)


def load(engine: Engine, run_dir: Path) -> dict | None:
    """Load the newest checkpoint of the run into the engine; its client state, or None if none."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(checkpoint_dir(run_dir)), tag=tag)
    if path is None:
        raise UserError(f"checkpoint error: {checkpoint_dir(run_dir) / tag} could not be loaded; "
                        f"remove it (and fix {checkpoint_dir(run_dir) / 'latest'}) or set checkpoint.resume=false")
    return client_state
