"""A checkpoint's state.json: our resumable state beside DeepSpeed's files, as one versioned dataclass.

A file it cannot read raises UserError; dist_lm.store.checkpoints.problem_with turns that into "its
state.json is unreadable (...)", which the resume and the tools say in one line.

The trainer builds it (``Trainer.state_dict``); everything reads it back through ``RunState.read``
(the resume, the tools, ``dist-lm runs``), which also reads the files of earlier versions: a field
they lack takes its default. VERSION goes up when a field is added or its meaning changes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from dist_lm.config.schema import UserError

STATE = "state.json"
PRECISIONS = ("fp32", "bf16", "bf16-autocast", "fp16", "fp8")  # dist_lm.runtime.precision.Precision's values


def inside(name) -> bool:
    """Whether a manifest's file name stays inside its checkpoint directory."""
    return isinstance(name, str) and bool(name) and not Path(name).is_absolute() and ".." not in Path(name).parts


# 2: "run_dir", "checksums". 1: "version" itself, "log_window". 0: every file written before
# (they have no "version").
VERSION = 2


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
    checksums: dict[str, str] = field(default_factory=dict)  # ... and its content ("xxh3_128:<hex>"); {} before 2
    run_dir: str | None = None  # the absolute run directory that saved it; None before version 2
    version: int = VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "RunState":
        version = data.get("version", 0)
        if version > VERSION:
            raise UserError(
                f"{where} is state version {version}, newer than this dist-lm "
                f"reads ({VERSION}); update dist-lm to resume or read it"
            )
        known = {f.name for f in fields(cls)}
        try:
            state = cls(**{k: v for k, v in data.items() if k in known and k != "version"}, version=version)
        except TypeError as e:  # a required field missing: not a state.json of ours
            raise UserError(f"{where} is not a dist-lm state file ({e})") from None
        problem = state.problem()
        if problem:
            raise UserError(f"{where}: {problem}")
        return state

    def problem(self) -> str | None:
        """What in a state.json's content is not what dist-lm writes, naming the field, or None:
        a checkpoint from elsewhere is data, checked before anything is read by it (its manifest
        names files inside the checkpoint, its counts are counts)."""

        def count(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        if not count(self.step):
            return f"step is {self.step!r}, not a step count"
        if not isinstance(self.config, dict) or not isinstance(self.data, dict):
            return "config and data must be mappings"
        if not isinstance(self.manifest, dict) or not all(inside(n) and count(v) for n, v in self.manifest.items()):
            return "manifest must map file names inside the checkpoint to their sizes"
        if not isinstance(self.checksums, dict) or not all(
            n in self.manifest and isinstance(v, str) for n, v in self.checksums.items()
        ):
            return "checksums must map files of the manifest to their checksums"
        if self.world_size is not None and not (count(self.world_size) and self.world_size > 0):
            return f"world_size is {self.world_size!r}"
        if self.zero_stage not in (None, 0, 1, 2, 3) or isinstance(self.zero_stage, bool):
            return f"zero_stage is {self.zero_stage!r}"
        if self.precision not in PRECISIONS:
            return f"precision is {self.precision!r}, not one of {', '.join(PRECISIONS)}"
        return None

    @classmethod
    def read(cls, checkpoint_dir: Path) -> "RunState":
        path = checkpoint_dir / STATE
        return cls.from_dict(json.loads(path.read_text()), str(path))
