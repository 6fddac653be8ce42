"""Reading a checkpoint back: into an engine, on the world size and ZeRO stage it was saved on
or, through DeepSpeed's universal format, on others; or as the model's full weights, for the
tools (evaluate, generate, export), whatever the run's precision, stage and world size.
(Writing and finding checkpoints: :mod:`dist_lm.train.checkpoint`.)

Nothing is unpickled. Our weights files are safetensors; DeepSpeed's own files are pickles,
which torch reads here with its weights-only unpickler: tensors, plain containers and numbers,
and the few DeepSpeed types named in :func:`allow_deepspeed_types`, rebuilt from their fields
with no code run. :func:`impose_weights_only` makes that hold for every ``torch.load`` of the
process, DeepSpeed's own (which ask for full unpickling) and its subprocesses' included; only
``--trust-checkpoint`` lifts it (docs/reliability.md: the trust model)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Callable

import torch

from dist_lm.config.io import from_dict, parse_override
from dist_lm.config.run_sections import CheckpointConfig, RunConfig
from dist_lm.config.schema import Config, UserError
from dist_lm.data.checks import ResolvedData
from dist_lm.data.sampler import TrainData
from dist_lm.model.counts import parameter_shapes
from dist_lm.observe import log
from dist_lm.runtime.precision import Precision
from dist_lm.store import checkpoints
from dist_lm.store.checkpoints import WEIGHTS_GLOB, CheckpointError, Found
from dist_lm.store.state import RunState
from dist_lm.train import checkpoint
from dist_lm.train.checkpoint import Engine

UNIVERSAL = "universal"  # subdirectory of a tag holding its universal-format conversion
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch reads it at every torch.load
NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
TRUST_FLAG = "--trust-checkpoint"
_trusted = False


def trust_checkpoints(trusted: bool) -> None:
    """``--trust-checkpoint``: this process may unpickle whatever its checkpoints hold."""
    global _trusted
    _trusted = trusted


def impose_weights_only() -> None:
    """Unless checkpoints are trusted (:func:`trust_checkpoints`), make every ``torch.load`` of this
    process and of the processes it starts weights-only, even where the caller (DeepSpeed's
    loaders) asks for full unpickling. Called before anything is loaded."""
    if _trusted:
        os.environ.pop(FORCE_WEIGHTS_ONLY, None)
    else:
        os.environ.pop(NO_WEIGHTS_ONLY, None)  # torch refuses both set at once
        os.environ[FORCE_WEIGHTS_ONLY] = "1"


def allow_deepspeed_types() -> None:
    """Let torch's weights-only unpickler rebuild the few DeepSpeed types its checkpoint files hold
    besides tensors and plain data (found by loading every file of bf16 and fp32 checkpoints at
    ZeRO 0-3): the loss scaler's state, the ZeRO stage, and BF16_Optimizer's fragment addresses.
    They are rebuilt from their saved fields; none of their code runs."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    torch.serialization.add_safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address])


def untrusted(path: Path, error: Exception | str) -> CheckpointError:
    """The one line for a checkpoint file that holds more than weights-only unpickling builds."""
    text = str(error)
    found = re.search(r"(?:unsupported|Unsupported global:)\s+GLOBAL ([\w.]+)", text)
    what = f"an object of type {found.group(1)}" if found else "objects that are not tensors or plain data"
    return CheckpointError(
        f"checkpoint error: {path} holds {what}, which dist-lm does not unpickle (unpickling "
        f"runs code); if you made this checkpoint, or trust who did, pass {TRUST_FLAG}"
    )


def load_pickle(path: Path) -> dict:
    """One of DeepSpeed's checkpoint files, weights-only unless the process trusts checkpoints."""
    allow_deepspeed_types()
    try:
        return torch.load(path, map_location="cpu", weights_only=not _trusted)
    except pickle.UnpicklingError as e:
        raise untrusted(path, e) from None


def unpickling_problem(path: Path, rank: int = 0, world_size: int = 1) -> str | None:
    """Why a checkpoint's pickles cannot be read weights-only, or None: each of this rank's share of
    its .pt files (every world_size-th) is unpickled weights-only with its tensors memory-mapped,
    which reads no tensor data, before DeepSpeed's loader touches any of them. Checked by every
    rank before the load, so that a refusal is agreed on instead of one rank failing inside
    DeepSpeed's collectives."""
    if _trusted:
        return None
    allow_deepspeed_types()
    files = sorted(p for p in path.glob("*.pt"))
    for f in files[rank::world_size]:
        try:
            torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            return str(untrusted(f, e))
        except (RuntimeError, OSError, EOFError, ValueError) as e:  # not torch's zip format, cut short, ...
            return f"checkpoint error: {f} cannot be read ({str(e).strip().splitlines()[0] if str(e).strip() else e!r})"
    return None


def needs_universal(state: RunState, world_size: int, zero_stage: int, tensor_parallel_size: int = 1) -> bool:
    """Whether the checkpoint's ZeRO shards, or its tensor-parallel shards of the layers, no
    longer line up with this run's ranks."""
    saved_world, saved_stage = state.world_size, state.zero_stage
    saved_tp = saved_tensor_parallel_size(state)
    same_tp = saved_tp == tensor_parallel_size
    if saved_world is None or (saved_world == world_size and saved_stage == zero_stage and same_tp):
        return False
    if saved_stage == 0 or zero_stage == 0:
        if saved_stage == zero_stage and same_tp:
            return False  # ZeRO-0 keeps whole copies: any world size loads them
        change = (
            f"ZeRO stage {saved_stage} and this run uses stage {zero_stage}"
            if saved_stage != zero_stage
            else f"tensor-parallel size {saved_tp} at ZeRO stage 0 and this run uses {tensor_parallel_size}"
        )
        fix = (
            f"parallel.zero_stage={saved_stage}"
            if saved_stage != zero_stage
            else f"parallel.tensor_parallel_size={saved_tp}"
        )
        raise CheckpointError(
            f"checkpoint error: the checkpoint was saved at {change}; across stage 0 it cannot be converted: "
            f"resume with {fix}"
        )
    if saved_stage != zero_stage and 3 in (saved_stage, zero_stage):
        # DeepSpeed 0.19.8's universal loader looks for ZeRO-3's model-states file in a stage-1/2
        # conversion and the other way round, and its ZeRO-3 loader reads another optimizer-state
        # layout than stages 1-2 write: it stopped with a bare AssertionError or KeyError, in fp32
        # and bf16 alike. Refused here, before anything is written.
        raise CheckpointError(
            f"checkpoint error: the checkpoint was saved at ZeRO stage {saved_stage} and this run uses stage "
            f"{zero_stage}; DeepSpeed 0.19.8's universal format does not convert into or out of ZeRO-3 (another "
            f"rank count at stage 3 it does): resume with parallel.zero_stage={saved_stage}"
        )
    return True


def saved_tensor_parallel_size(state: RunState) -> int:
    """The tensor-parallel size a checkpoint was saved under (its config; 1 before there was one)."""
    parallel = state.config.get("parallel") if isinstance(state.config, dict) else None
    size = parallel.get("tensor_parallel_size", 1) if isinstance(parallel, dict) else 1
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else 1


def check_precision(state: RunState, precision: Precision) -> str | None:
    """Refuse to resume a bf16-autocast checkpoint (fp32 weights, torch's optimizer state) in a
    precision with low-precision weights and DeepSpeed's fp32 masters, or the other way round:
    their optimizer states are not the same thing. (fp32 and bf16-autocast share theirs.)
    Another change of precision loads, but the run then trains differently from how it began (a
    resumed fp8 run whose command no longer says fp8 goes on in bf16): returns the line that says so."""
    saved = Precision(state.precision)
    if Precision.BF16_AUTOCAST in (saved, precision) and saved.mixed != precision.mixed:
        stage = f" parallel.zero_stage={state.zero_stage}" if state.zero_stage is not None else ""
        raise CheckpointError(
            f"checkpoint error: the checkpoint was saved in parallel.precision={saved} and this "
            f"run trains in {precision}, whose weights and optimizer state are kept differently: "
            f"resume with parallel.precision={saved}{stage}"
        )
    if saved is precision:
        return None
    return (
        f"the checkpoint was saved in parallel.precision={saved}; this run goes on in {precision} "
        f"(parallel.precision); to keep training as it began, resume with parallel.precision={saved}"
    )


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
    found = checkpoints.find(resume, CheckpointConfig(dir=given.get("checkpoint.dir")).root(run_dir))
    return None if found is None else (Precision(found.state.precision), found.state.zero_stage)


def convert_to_universal(path: Path, rank: int, barrier: Callable[[], None]) -> Path:
    """DeepSpeed's ds_to_universal on rank 0 (once per checkpoint; kept beside it)."""
    out = path / UNIVERSAL
    if rank == 0 and not (out / ".complete").exists():
        shutil.rmtree(out, ignore_errors=True)
        # dist_lm.train.to_universal: DeepSpeed's converter, with its types allowed to the
        # weights-only unpickler that this process's environment imposes on it
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "dist_lm.train.to_universal",
                "--input_folder",
                str(path),
                "--output_folder",
                str(out),
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            if "Weights only load failed" in proc.stderr:
                raise untrusted(path, proc.stderr)
            raise CheckpointError(
                f"checkpoint error: converting {path} to DeepSpeed's universal format failed: "
                f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}"
            )
        (out / ".complete").write_text("")
    barrier()
    return out


def consolidated_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model's full fp32 weights from a complete checkpoint directory, whatever its precision,
    ZeRO stage, optimizer and world size: its weights files. Checkpoints from before those files
    were written are read as then: the module itself at ZeRO-0, DeepSpeed's zero_to_fp32 for
    ZeRO 1-3, and where it refuses BF16_Optimizer's files, DeepSpeed's universal format."""
    impose_weights_only()
    files = sorted(path.glob(WEIGHTS_GLOB))
    if files:
        return _read_weights(files)
    if RunState.read(path).zero_stage == 0:
        module = load_pickle(path / "mp_rank_00_model_states.pt")["module"]
        return {k: v.float() for k, v in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    problem = unpickling_problem(path)  # zero_to_fp32 loads with full unpickling where trusted
    if problem:
        raise CheckpointError(problem)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress; our tools print results
            return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    except ValueError:  # "... is not a zero checkpoint": BF16_Optimizer's files (bf16 at ZeRO-1)
        universal = convert_to_universal(path, 0, lambda: None)
        return {f.parent.name: load_pickle(f)["param"].float() for f in sorted((universal / "zero").glob("*/fp32.pt"))}


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
    """Load ``found`` into the engine (built with load_universal when ``universal``); its pickles
    were checked by every rank (:func:`unpickling_problem`), and DeepSpeed's loader reads them
    weights-only (:func:`impose_weights_only`)."""
    load_dir, tag = (found.path, UNIVERSAL) if universal else (found.path.parent, found.path.name)
    allow_deepspeed_types()
    with contextlib.redirect_stdout(io.StringIO()):  # BF16_Optimizer prints bare lines while it loads
        loaded, _ = engine.load_checkpoint(str(load_dir), tag=tag)
    if loaded is None:
        raise CheckpointError(
            f"checkpoint error: {found.path} could not be loaded; give another one with "
            "checkpoint.resume=PATH, or start fresh with checkpoint.resume=none"
        )


def check_same_data(cfg: Config, found: checkpoints.Found, data: ResolvedData) -> None:
    """Refuse to resume on other data (unless checkpoint.allow_data_change). A mixture's weights
    are not its data: they may change."""
    state = found.state
    if state.tokenizer_sha256 != data.meta["tokenizer_sha256"]:
        problem = (
            f"{found.path} was trained on tokens of tokenizer {str(state.tokenizer_sha256)[:12]}, but "
            f"{data.dir} was made with {str(data.meta['tokenizer_sha256'])[:12]}"
        )
    else:
        saved, now = state.data_fingerprint, data.fingerprint()
        if saved is None or saved["sha256"] == now["sha256"]:
            return
        problem = (
            f"{found.path} was trained on data {saved['sha256'][:12]} ({saved['train_tokens']:,} training "
            f"tokens), but {data.describe()} is {now['sha256'][:12]} ({now['train_tokens']:,} tokens)"
        )
    if cfg.checkpoint.allow_data_change:
        log.warn(f"{problem}; continuing as --allow-data-change asks (the data order continues by sample count)")
        return
    raise UserError(
        f"data error: {problem}; resume with the same data.dir, pass --allow-data-change to continue "
        "on this data, or start a new run.name"
    )


def check_same_model(cfg: Config, found: checkpoints.Found) -> None:
    """Refuse, before anything is written, a checkpoint whose weights do not fit this run's model
    (e.g. --allow-data-change onto data of another vocabulary size)."""
    saved = from_dict(found.state.config, str(found.path / checkpoints.STATE)).model
    theirs, ours = parameter_shapes(saved), parameter_shapes(cfg.model)
    if theirs == ours:
        return
    name = next(n for n in [*ours, *theirs] if theirs.get(n) != ours.get(n))  # the first, in the model's order
    changed = [
        f"model.{f.name} {getattr(saved, f.name)} -> {getattr(cfg.model, f.name)}"
        for f in fields(saved)
        if getattr(saved, f.name) != getattr(cfg.model, f.name)
    ]
    raise UserError(
        f"config error: {found.path} holds another model: {name} is {theirs.get(name)} there "
        f"and {ours.get(name)} here ({', '.join(changed)}); resume with the checkpoint's model "
        "settings and data, or start a new run.name"
    )


def resume(
    model_engine: Engine, train_data: TrainData, found: checkpoints.Found, universal: bool, cfg: Config, rank: int
) -> None:
    """The engine's and the data's side of a resume: weights, optimizer state, this rank's random
    state, where the data order continues. (The loop restores its own counters: Trainer.)"""
    from dist_lm.runtime import engine  # deepspeed: imported only where an engine is resumed

    load(model_engine, found, universal)
    if universal:
        engine.restore_weight_decay(model_engine, cfg.optim)
    rng = found.path / f"rng-rank{rank}.json"
    if not universal and rng.is_file():  # on another world size the ranks are not the same ranks
        checkpoint.set_rng_state(json.loads(rng.read_text()))
    train_data.load_state_dict(found.state.data)
    if found.note:
        log.warn(found.note)
    how = (
        (
            f" via DeepSpeed's universal format (saved on {found.state.world_size} ranks at ZeRO stage "
            f"{found.state.zero_stage})"
        )
        if universal
        else ""
    )
    log.info(
        f"resumed from {found.path} at step {found.state.step} ({train_data.samples_consumed} samples consumed){how}"
    )
