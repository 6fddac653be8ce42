"""Reading a checkpoint back: into an engine, on the world size and ZeRO stage it was saved on
or, through DeepSpeed's universal format, on others; or as the model's full weights, for the
tools (evaluate, generate, export), whatever the run's precision, stage and world size.
(Writing and finding checkpoints: :mod:`dist_lm.train.checkpoint`.)"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

from dist_lm.config.io import parse_override
from dist_lm.config.run_sections import CheckpointConfig, RunConfig
from dist_lm.runtime.precision import Precision
from dist_lm.train import checkpoint
from dist_lm.train.checkpoint import WEIGHTS_GLOB, CheckpointError, Engine, Found
from dist_lm.train.state import RunState

UNIVERSAL = "universal"  # subdirectory of a tag holding its universal-format conversion


def needs_universal(state: RunState, world_size: int, zero_stage: int) -> bool:
    """Whether the checkpoint's ZeRO shards no longer line up with this run's ranks."""
    saved_world, saved_stage = state.world_size, state.zero_stage
    if saved_world is None or (saved_world == world_size and saved_stage == zero_stage):
        return False
    if saved_stage == 0 or zero_stage == 0:
        if saved_stage == zero_stage:
            return False  # ZeRO-0 keeps whole copies: any world size loads them
        raise CheckpointError(f"checkpoint error: the checkpoint was saved at ZeRO stage {saved_stage} and this run "
                              f"uses stage {zero_stage}; across stage 0 it cannot be converted: resume with "
                              f"parallel.zero_stage={saved_stage}")
    return True


def check_precision(state: RunState, precision: Precision) -> str | None:
    """Refuse to resume a bf16-autocast checkpoint (fp32 weights, torch's optimizer state) in a
    precision with low-precision weights and DeepSpeed's fp32 masters, or the other way round:
    their optimizer states are not the same thing. (fp32 and bf16-autocast share theirs.)
    Another change of precision loads, but the run then trains differently from how it began (a
    resumed fp8 run whose command no longer says fp8 goes on in bf16): returns the line that says so."""
    saved = Precision(state.precision)
    if Precision.BF16_AUTOCAST in (saved, precision) and saved.mixed != precision.mixed:
        stage = f" parallel.zero_stage={state.zero_stage}" if state.zero_stage is not None else ""
        raise CheckpointError(f"checkpoint error: the checkpoint was saved in parallel.precision={saved} and this "
                              f"run trains in {precision}, whose weights and optimizer state are kept differently: "
                              f"resume with parallel.precision={saved}{stage}")
    if saved is precision:
        return None
    return (f"the checkpoint was saved in parallel.precision={saved}; this run goes on in {precision} "
            f"(parallel.precision); to keep training as it began, resume with parallel.precision={saved}")


def resumed_settings(overrides: list[str]) -> tuple[Precision, int | None] | None:
    """The precision and ZeRO stage of the checkpoint that a run given only these dotted overrides
    (the auto plan, which has no config file) resumes; None for a fresh start. Read before
    planning, so that the plan does not choose what check_precision or needs_universal would
    refuse. A run named by neither run.dir, run.name nor checkpoint.dir starts in a new directory."""
    given = {key: None if value is None else str(value) for key, value in map(parse_override, overrides)}
    resume = given.get("checkpoint.resume") or "auto"
    named = any(given.get(key) for key in ("run.name", "run.dir", "checkpoint.dir"))
    if resume == "none" or (resume == "auto" and not named):
        return None  # a fresh start: nothing to resume, or a new directory named by the start time
    run_dir = RunConfig(dir=given.get("run.dir")).dir_for(given.get("run.name") or "")
    found = checkpoint.find(resume, CheckpointConfig(dir=given.get("checkpoint.dir")).root(run_dir))
    return None if found is None else (Precision(found.state.precision), found.state.zero_stage)


def convert_to_universal(path: Path, rank: int, barrier: Callable[[], None]) -> Path:
    """DeepSpeed's ds_to_universal on rank 0 (once per checkpoint; kept beside it)."""
    out = path / UNIVERSAL
    if rank == 0 and not (out / ".complete").exists():
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               str(path), "--output_folder", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise CheckpointError(f"checkpoint error: converting {path} to DeepSpeed's universal format failed: "
                                  f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        (out / ".complete").write_text("")
    barrier()
    return out


def consolidated_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model's full fp32 weights from a complete checkpoint directory, whatever its precision,
    ZeRO stage, optimizer and world size: its weights files. Checkpoints from before those files
    were written are read as then: the module itself at ZeRO-0, DeepSpeed's zero_to_fp32 for
    ZeRO 1-3, and where it refuses BF16_Optimizer's files, DeepSpeed's universal format."""
    files = sorted(path.glob(WEIGHTS_GLOB))
    if files:
        return _read_weights(files)
    if RunState.read(path).zero_stage == 0:
        module = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        return {k: v.float() for k, v in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress; our tools print results
            return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    except ValueError:  # "... is not a zero checkpoint": BF16_Optimizer's files (bf16 at ZeRO-1)
        universal = convert_to_universal(path, 0, lambda: None)
        return {f.parent.name: torch.load(f, map_location="cpu", weights_only=False)["param"].float()
                for f in sorted((universal / "zero").glob("*/fp32.pt"))}


def _read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    weights: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as shard:
                aliases |= json.loads((shard.metadata() or {}).get("aliases", "{}"))
                weights |= {name: shard.get_tensor(name) for name in shard.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint error: {f} is unreadable ({e}); use another checkpoint") from None
    return weights | {alias: weights[name] for alias, name in aliases.items() if name in weights}


def load(engine: Engine, found: Found, universal: bool) -> None:
    """Load ``found`` into the engine (built with load_universal when ``universal``)."""
    load_dir, tag = (found.path, UNIVERSAL) if universal else (found.path.parent, found.path.name)
    loaded, _ = engine.load_checkpoint(str(load_dir), tag=tag)
    if loaded is None:
        raise CheckpointError(f"checkpoint error: {found.path} could not be loaded; give another one with "
                              "checkpoint.resume=PATH, or start fresh with checkpoint.resume=none")
