"""Checkpoints through DeepSpeed's engine, with our resumable state as explicit client state.

Layout (the root is checkpoint.dir, by default RUN_DIR/checkpoints)::

    step00000100/   DeepSpeed's files, sharded per rank as ZeRO makes them
                    weights-rank<N>.safetensors   the model's full fp32 weights, a share per rank
                    rng-rank<N>.json   each rank's random-number generators
                    state.json         our state and a manifest of every file with its size
    latest          the tag of the newest complete checkpoint
    best            the tag of the complete checkpoint with the lowest validation loss

A save is complete only when state.json exists: rank 0 writes it after every rank has finished
writing and the files were flushed to disk, then moves ``latest`` (write a temporary file and
rename). state.json's manifest holds every other file's size and checksum (each rank hashes a
share of the files while they are still in the page cache). A checkpoint without state.json, or
whose files do not match the manifest's sizes (truncated, deleted), is never chosen; the one
about to be read is also checked against the checksums (:func:`checksum_problem`), and a
mismatch passes over to the previous complete checkpoint with a warning. Older checkpoints are
deleted only after a newer one is complete.

A checkpoint root holds one run's checkpoints: a root given as checkpoint.dir is locked while a
run saves into it, and a run is refused one that another run's checkpoints are in
(:func:`owner_problem`).

Our state is plain JSON, so it is read before the engine exists, e.g. to refuse a resume on
other data before loading any tensor, or to see that the run was saved on another world size
or ZeRO stage and must go through DeepSpeed's universal checkpoint format.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dist_lm.config.schema import UserError
from dist_lm.files import as_umask_allows, checksum, write_atomic
from dist_lm.runtime import distributed
from dist_lm.train.state import STATE, RunState

Engine = Any  # a deepspeed.DeepSpeedEngine; only its methods are used here
LATEST = "latest"
BEST = "best"
WEIGHTS = "weights-rank{rank:05d}.safetensors"
WEIGHTS_GLOB = "weights-rank*.safetensors"


class CheckpointError(UserError):
    """A checkpoint cannot be written or read; the message names the path and the way out."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(path: Path) -> int | None:
    name = path.name
    return int(name[4:]) if name.startswith("step") and name[4:].isdigit() else None


# --------------------------------------------------------------------------------- finding one
def problem_with(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from, or None if it is complete."""
    try:
        state = RunState.read(path)
    except FileNotFoundError:
        return f"it has no {STATE} (the save did not finish)"
    except (OSError, json.JSONDecodeError, UserError) as e:
        return f"its {STATE} is unreadable ({e})"
    for name, size in state.manifest.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return None


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first."""
    return [p for p in _step_dirs(root) if problem_with(p) is None]


def _step_dirs(root: Path) -> list[Path]:
    """The checkpoint directories (step<N>) under root, complete or not, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of)


@dataclass
class Found:
    path: Path
    state: RunState
    note: str | None = None
    """Said when the checkpoint is not the one ``latest`` names."""


Verify = Callable[[Path], "str | None"]
"""Why a complete checkpoint's content cannot be used (a checksum mismatch), or None."""


def find(resume: str, root: Path, verify: Verify | None = None) -> Found | None:
    """The checkpoint to resume from: ``auto`` (the newest complete one under root, if any),
    ``none``, or a path (a checkpoint directory, or a run directory / checkpoint root).
    ``verify``: checks the content of the one chosen (see :func:`_newest`)."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if (path / STATE).exists() or step_of(path) is not None:
            problem = problem_with(path) or (verify(path) if verify else None)
            if problem:
                raise CheckpointError(
                    f"checkpoint error: checkpoint.resume={resume}: {problem}; give another "
                    "checkpoint, or checkpoint.resume=auto for the newest complete one"
                )
            return Found(path, RunState.read(path))
        root = checkpoint_root(path, f"checkpoint.resume={resume}")
    return _newest(root, resume != "auto", f"checkpoint.resume={resume}", verify)


def checkpoint_root(path: Path, what: str) -> Path:
    """The checkpoint root of ``path``: a run directory's checkpoints/, or ``path`` itself when it
    holds checkpoints; ``what`` names the argument in the error."""
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint error: {what}: {path} does not exist; give a checkpoint directory "
            "(…/checkpoints/stepNNNNNNNN) or a run directory"
        )
    if not (path / LATEST).is_file() and not any(step_of(p) is not None for p in path.iterdir()):
        raise CheckpointError(
            f"checkpoint error: {what}: {path} is not a checkpoint, a run directory or a checkpoint "
            f"root (it has no {STATE}, no checkpoints/ and no stepNNNNNNNN/); give one of those"
        )
    return path


def find_for_reading(path: Path, best: bool = False) -> Found:
    """The checkpoint a tool reads: ``path`` itself if it is a checkpoint directory, else the newest
    complete one of a run directory or checkpoint root, or with ``best`` the one ``best`` names.
    The files a tool reads (its weights files) are checked against their checksums."""
    if (path / STATE).exists() or step_of(path) is not None:
        if best:
            raise CheckpointError(
                f"checkpoint error: --best takes a run directory, and {path} is one checkpoint; "
                "give its run directory, or leave out --best"
            )
        problem = problem_with(path) or weights_checksum_problem(path)
        if problem:
            raise CheckpointError(
                f"checkpoint error: {path} cannot be read: {problem}; give another checkpoint, "
                "or the run directory for its newest complete one"
            )
        return Found(path, RunState.read(path))
    root = checkpoint_root(path, str(path))
    if not best:
        found = _newest(root, True, str(path), weights_checksum_problem, "reading")
        assert found is not None  # _newest raises when a checkpoint is required and there is none
        return found
    pointer = root / BEST
    if not pointer.is_file():
        raise CheckpointError(
            f"checkpoint error: --best: {root} has no {BEST} pointer: no checkpoint was saved at a "
            "step with a validation loss (checkpoints save it when train.eval_interval divides "
            "their step); leave out --best for the newest checkpoint"
        )
    named = root / pointer.read_text().strip()
    if step_of(named) is None or named.parent != root:
        raise CheckpointError(
            f"checkpoint error: --best: {pointer} names {named.name!r}, not a checkpoint of "
            f"{root}; leave out --best for the newest complete checkpoint"
        )
    problem = problem_with(named) or weights_checksum_problem(named)
    if problem:
        raise CheckpointError(
            f"checkpoint error: --best: {named}, the best checkpoint, cannot be read: {problem}; "
            "leave out --best for the newest complete checkpoint"
        )
    return Found(named, RunState.read(named))


def _newest(
    root: Path, required: bool, what: str, verify: Verify | None = None, doing: str = "resuming from"
) -> Found | None:
    """The newest complete checkpoint under root, by step: normally the one ``latest`` names, but
    also after a process died between writing a checkpoint's state.json and moving ``latest``, or
    when ``verify`` finds the newer ones' content damaged. Its note names every newer checkpoint
    directory passed over: incomplete (a save that died) or damaged."""
    skipped: list[tuple[int, str]] = [
        (step_of(p), f"{p.name} is incomplete ({why})") for p in _step_dirs(root) if (why := problem_with(p))
    ]
    for candidate in reversed(complete_checkpoints(root)):
        damaged = verify(candidate) if verify else None
        if damaged is None:
            passed = [note for step, note in sorted(skipped, reverse=True) if step > step_of(candidate)]
            note = f"{'; '.join(passed)}; {doing} {candidate.name}, the newest complete checkpoint" if passed else None
            return Found(candidate, RunState.read(candidate), note)
        skipped.append((step_of(candidate), f"{candidate.name} is damaged ({damaged})"))
    if required:
        why = "".join(f"; {note}" for _, note in sorted(skipped, reverse=True)[:1])
        raise CheckpointError(
            f"checkpoint error: {what}: no complete checkpoint in {root}{why}; give another checkpoint or run directory"
        )
    return None


def incomplete_after(root: Path, step: int = -1) -> list[str]:
    """Each checkpoint directory under root past ``step`` whose save did not finish, newest
    first, said as "step00000012 is incomplete (why)"."""
    return [
        f"{p.name} is incomplete ({why})"
        for p in reversed(_step_dirs(root))
        if step_of(p) > step and (why := problem_with(p))
    ]


def checksum_problem(path: Path, names: list[str] | None = None, rank: int = 0, world_size: int = 1) -> str | None:
    """Why a complete checkpoint's files (``names``, default all) do not hold what was saved:
    the first whose checksum differs from the one its state.json records, or None. Checks this
    rank's share of them (every world_size-th, from ``rank``), so ranks check a checkpoint
    together. Checkpoints saved before checksums were recorded pass (their sizes were checked)."""
    recorded = RunState.read(path).checksums
    for name in sorted(recorded if names is None else set(names) & set(recorded))[rank::world_size]:
        try:
            if checksum(path / name) != recorded[name]:
                return f"{name} does not match the checksum recorded when it was saved: it changed or is damaged"
        except OSError as e:
            return f"{name} cannot be read ({e.strerror or e})"
    return None


def weights_checksum_problem(path: Path) -> str | None:
    """checksum_problem of the files a tool reads: the weights files, or every file of a checkpoint
    written before them (which the tools read through DeepSpeed's own files)."""
    weights = [p.name for p in path.glob(WEIGHTS_GLOB)]
    return checksum_problem(path, weights or None)


def checksum_problem_together(path: Path) -> str | None:
    """checksum_problem over every file, each rank checking its share (a collective): the same
    answer on every rank."""
    return distributed.first_problem(checksum_problem(path, None, distributed.rank(), distributed.world_size()))


def owner_problem(root: Path, run_dir: Path) -> str | None:
    """Why a run in ``run_dir`` cannot save into the checkpoint root ``root`` (checkpoint.dir),
    or None: the root's newest complete checkpoint was saved by another run directory. Two runs
    in one root would write the same stepNNNNNNNN directories, and each would resume the other's
    newest. (Checkpoints of earlier versions name no run directory: one saved in its run's own
    checkpoints/ belongs to that directory; of others the owner is not known, and they pass.)"""
    complete = complete_checkpoints(root)
    if not complete:
        return None
    newest = complete[-1]
    state = RunState.read(newest)
    owner = state.run_dir
    if owner is None and not (state.config.get("checkpoint") or {}).get("dir") and root.name == "checkpoints":
        owner = str(root.parent.resolve())
    if owner is None or Path(owner) == run_dir.resolve():
        return None
    return (
        f"checkpoint error: checkpoint.dir={root} holds the checkpoints of the run in {owner} ({newest.name} is "
        "its newest); two runs saving into one checkpoint.dir overwrite each other's steps: give this run a "
        f"checkpoint.dir of its own (to start from that run's checkpoint, also pass --resume {newest})"
    )


# ------------------------------------------------------------------------------------- saving
def rng_state() -> dict:
    """This process's random-number generators as JSON-able plain values."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def bytes_needed(root: Path, fallback: int) -> int:
    """Room for one more checkpoint: the size of the newest complete one, else ``fallback``."""
    complete = complete_checkpoints(root)
    if not complete:
        return fallback
    return sum(RunState.read(complete[-1]).manifest.values()) or fallback


def check_room(root: Path, need: int) -> str | None:
    """Why a checkpoint of ``need`` bytes cannot be written under root, or None. Creates nothing
    (it runs at start-up too, before the run directory is written): it probes the nearest
    directory that exists, root or one above it, with a file it removes at once."""
    existing = next((p for p in (root, *root.parents) if p.exists()), Path("/"))
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{existing} is a file")
        probe = existing / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        return f"{root} is not writable ({e.strerror or e}); set checkpoint.dir to a writable directory"
    free = shutil.disk_usage(existing).free
    if free < need:
        return (
            f"not enough space in {root}: a checkpoint needs about {need / 1e9:.2f} GB ({need:,} bytes), "
            f"{free / 1e9:.2f} GB are free; free some, lower checkpoint.keep_last, or set checkpoint.dir"
        )
    return None


def save(
    engine: Engine,
    root: Path,
    step: int,
    state: RunState,
    rank: int,
    world_size: int,
    weights: Callable[[], dict],
    aliases: dict[str, str],
) -> Path:
    """Save on every rank (a collective over dist_lm.runtime.distributed's CPU group).
    ``weights()`` gathers this rank's share of the full weights (a collective too:
    dist_lm.engine.master_weights); ``aliases`` names the tied ones ({alias: name})."""
    path = root / tag_for(step)
    if rank == 0 and path.exists():  # an older save of this step (before a resume from an earlier one):
        shutil.rmtree(path)  # not complete again until this save's state.json, nor a mix of both
    distributed.barrier()
    failed = None
    try:
        engine.save_checkpoint(str(root), tag=tag_for(step), save_latest=False)
        write_weights(path, rank, weights(), aliases)
        write_atomic(path / f"rng-rank{rank}.json", json.dumps(rng_state()), durable=True)
    except Exception as e:  # a full or failing disk: agree on it below instead of leaving others waiting.
        failed = f"rank {rank}: writing {path} failed: {_reason(e)}"
    _agree_or_remove(failed, path, rank, "another rank could not write the checkpoint")
    distributed.barrier()  # every rank's files are written
    # Each rank makes its share of the files durable and hashes it (they are in the page cache
    # now), in the order rank 0 lists them, so that every file is done once.
    names = distributed.from_rank0(
        sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.is_file() and f.name != STATE)
        if rank == 0
        else None
    )
    mine: dict[str, tuple[int, str]] = {}
    failed = None
    try:
        for name in names[rank::world_size]:
            with open(path / name, "rb") as fh:
                os.fsync(fh.fileno())  # on disk before state.json says the checkpoint is complete
                mine[name] = (os.fstat(fh.fileno()).st_size, checksum(path / name))
    except OSError as e:
        failed = f"rank {rank}: reading back {path} failed: {_reason(e)}"
    _agree_or_remove(failed, path, rank, "another rank could not read the checkpoint back")
    files = {name: done for share in distributed.all_gather_objects(mine) for name, done in share.items()}
    if rank == 0:
        manifest = {name: files[name][0] for name in names}
        checksums = {name: files[name][1] for name in names}
        write_atomic(path / STATE, replace(state, manifest=manifest, checksums=checksums).to_json(), durable=True)
        write_atomic(root / LATEST, tag_for(step), durable=True)
    distributed.barrier()
    return path


def _reason(e: Exception) -> str:
    # Any exception: torch's writer reports a full disk as RuntimeError ("unexpected pos").
    return e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip().splitlines() or [repr(e)])[0]


def _agree_or_remove(failed: str | None, path: Path, rank: int, other: str) -> None:
    """Agree on a failure of some rank (a collective); on one, rank 0 removes the incomplete
    checkpoint and every rank raises, naming this rank's failure or ``other``."""
    if distributed.any_rank(failed is not None):
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)  # incomplete: free what it took
        raise CheckpointError(f"checkpoint error: {failed or other}; the previous complete checkpoint is intact")


def write_weights(path: Path, rank: int, tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
    """This rank's share of the full weights as safetensors (rank 0's file also says which names
    are tied). Why a file of full weights beside DeepSpeed's: DeepSpeed's optimizer files differ
    by ZeRO stage, precision and optimizer (zero_to_fp32 cannot read BF16_Optimizer's, which bf16
    at ZeRO-1 uses), while every tool needs only the weights. Gathering them while the engine is
    up is exact (the fp32 masters) and the same for every configuration; reading them back is a
    plain, memory-mapped load at any world size. What it costs is in docs/benchmarks.md."""
    from safetensors.torch import save_file

    if not tensors and rank != 0:
        return
    metadata = {"format": "pt", "aliases": json.dumps(aliases)} if rank == 0 else {"format": "pt"}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / WEIGHTS.format(rank=rank)), metadata)
    as_umask_allows(path / WEIGHTS.format(rank=rank))


def update_best(root: Path) -> Path | None:
    """Point ``best`` at the complete checkpoint with the lowest validation loss (saved at a step
    that evaluated), written atomically like ``latest``; None if no checkpoint has one. Rank 0."""
    scored = [(v, p) for p in complete_checkpoints(root) if (v := RunState.read(p).val_loss) is not None]
    if not scored:
        return None
    best = min(scored, key=lambda vp: vp[0])[1]
    if not (root / BEST).is_file() or (root / BEST).read_text().strip() != best.name:
        write_atomic(root / BEST, best.name, durable=True)
    return best


def prune(root: Path, keep_last: int, keep_best: bool) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (and the best by validation
    loss), and incomplete ones older than the newest complete one. Rank 0 only."""
    complete = complete_checkpoints(root)
    if not complete:
        return []
    keep = set(complete[-keep_last:]) if keep_last > 0 else set(complete)
    if keep_best:
        scored = [(RunState.read(p).val_loss, p) for p in complete]
        scored = [(v, p) for v, p in scored if v is not None]
        if scored:
            keep.add(min(scored, key=lambda vp: vp[0])[1])
    newest = step_of(complete[-1])
    removed = []
    for p in root.iterdir():
        step = step_of(p)
        if step is None or not p.is_dir() or p in keep:
            continue
        if p in complete or step < newest:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed
