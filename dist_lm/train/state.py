"""A checkpoint's state.json: our resumable state beside DeepSpeed's files, as one versioned dataclass.

A file it cannot read raises UserError; dist_lm.checkpoint.problem_with turns that into "its
state.json is unreadable (...)", which the resume and the tools say in one line.

The trainer builds it (``Trainer.state_dict``); everything reads it back through ``RunState.read``
(the resume, the tools, ``list_runs.py``), which also reads the files of earlier versions: a field
they lack takes its default. VERSION goes up when a field is added or its meaning changes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from dist_lm.config.schema import UserError

STATE = "state.json"
# 1: "version" itself, "log_window". 0: every file written before (they have no "version").
VERSION = 1


@dataclass
class RunState:
    step: int
    config: dict  # the run's config, as config_io.to_dict wrote it
    data: dict  # dist_lm.data.sampler.TrainData.state_dict(): where the data order continues
    best_val_loss: float | None = None
    val_loss: float | None = None  # of this step's evaluation, if it had one
    elapsed_s: float = 0.0  # training time of the run so far, every process of it
    evals_without_improvement: int = 0
    skipped_steps: int = 0
    tokens: int | None = None
    world_size: int | None = None  # None: not recorded (then the resume cannot tell a rank-count change)
    zero_stage: int | None = None
    precision: str = "fp32"
    parameters: int | None = None
    tokenizer_sha256: str | None = None
    data_fingerprint: dict | None = None  # dist_lm.shards.fingerprint of the data it trained on
    wandb_run_id: str | None = None
    log_window: dict | None = None  # dist_lm.observe.metrics.LogWindow.state_dict(); None before version 1
    manifest: dict[str, int] = field(default_factory=dict)  # every other file of the checkpoint: its size
    version: int = VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "RunState":
        version = data.get("version", 0)
        if version > VERSION:
            raise UserError(f"{where} is state version {version}, newer than this dist-lm "
                            f"reads ({VERSION}); update dist-lm to resume or read it")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known and k != "version"}, version=version)
        except TypeError as e:  # a required field missing: not a state.json of ours
            raise UserError(f"{where} is not a dist-lm state file ({e})") from None

    @classmethod
    def read(cls, checkpoint_dir: Path) -> "RunState":
        path = checkpoint_dir / STATE
        return cls.from_dict(json.loads(path.read_text()), str(path))
