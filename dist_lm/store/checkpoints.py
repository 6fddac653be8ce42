"""What a run keeps on disk and how it is found and checked again: checkpoint directories, their
state.json (dist_lm.store.state) and the ``latest``/``best`` pointers. Reading only: saving is
dist_lm.train.checkpoint's. Below both training and the tools that list or read runs.

Layout (the root is checkpoint.dir, by default RUN_DIR/checkpoints)::

    step00000100/   DeepSpeed's files, sharded per rank as ZeRO makes them
                    weights-rank<N>.safetensors   the model's full fp32 weights, a share per rank
                    rng-rank<N>.json   each rank's random-number generators
                    state.json         our state and a manifest of every file with its size and checksum
    latest          the tag of the newest complete checkpoint
    best            the tag of the complete checkpoint with the lowest validation loss

A checkpoint without state.json, or whose files do not match the manifest's sizes (truncated,
deleted), is never chosen; the one about to be read is also checked against the checksums
(:func:`checksum_problem`), and a mismatch passes over to the previous complete checkpoint with
a warning. A checkpoint root holds one run's checkpoints (:func:`owner_problem`).

Our state is plain JSON, so it is read before the engine exists, e.g. to refuse a resume on
other data before loading any tensor, or to see that the run was saved on another world size
or ZeRO stage and must go through DeepSpeed's universal checkpoint format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dist_lm.config.schema import UserError
from dist_lm.files import checksum
from dist_lm.runtime import distributed
from dist_lm.store.state import STATE, RunState

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
    named = "" if what == str(path) else f"{what}: "  # a tool's argument is the path itself
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint error: {named}{path} {'is a file' if path.exists() else 'does not exist'}; give a "
            "checkpoint directory (…/checkpoints/stepNNNNNNNN) or a run directory"
        )
    if not (path / LATEST).is_file() and not any(step_of(p) is not None for p in path.iterdir()):
        raise CheckpointError(
            f"checkpoint error: {named}{path} is not a checkpoint, a run directory or a checkpoint "
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
        return _readable(path, str(path), "give another checkpoint, or the run directory for its newest complete one")
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
    return _readable(
        named, f"--best: {named}, the best checkpoint,", "leave out --best for the newest complete checkpoint"
    )


def _readable(path: Path, what: str, fix: str) -> Found:
    """The checkpoint a tool was pointed at, once it is complete and its weights files match their
    checksums; else one line naming it (``what``) and the ``fix``."""
    problem = problem_with(path) or weights_checksum_problem(path)
    if problem:
        raise CheckpointError(f"checkpoint error: {what} cannot be read: {problem}; {fix}")
    return Found(path, RunState.read(path))


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
