"""Saving checkpoints through DeepSpeed's engine, with our resumable state as explicit client
state; pruning and the ``best`` pointer. (The layout, and finding and checking checkpoints:
dist_lm.store.checkpoints.)

A save is complete only when state.json exists: rank 0 writes it after every rank has finished
writing and the files were flushed to disk, then moves ``latest`` (write a temporary file and
rename). state.json's manifest holds every other file's size and checksum (each rank hashes a
share of the files while they are still in the page cache). Older checkpoints are deleted only
after a newer one is complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dist_lm.files import as_umask_allows, checksum, write_atomic
from dist_lm.runtime import distributed
from dist_lm.store.checkpoints import (
    BEST,
    LATEST,
    WEIGHTS,
    CheckpointError,
    complete_checkpoints,
    step_of,
    tag_for,
)
from dist_lm.store.state import STATE, RunState

Engine = Any  # a deepspeed.DeepSpeedEngine; only its methods are used here


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
    clear_older_save(path, rank)
    failed = None
    try:
        engine.save_checkpoint(str(root), tag=tag_for(step), save_latest=False)
        write_weights(path, rank, weights(), aliases)
        write_atomic(path / f"rng-rank{rank}.json", json.dumps(rng_state()), durable=True)
    except Exception as e:  # a full or failing disk: agree on it below instead of leaving others waiting.
        failed = f"rank {rank}: writing {path} failed: {reason(e)}"
    agree_or_remove(failed, path, rank, "another rank could not write the checkpoint")
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
        mine = flushed_and_hashed(path, names[rank::world_size])
    except OSError as e:
        failed = f"rank {rank}: reading back {path} failed: {reason(e)}"
    agree_or_remove(failed, path, rank, "another rank could not read the checkpoint back")
    files = {name: done for share in distributed.all_gather_objects(mine) for name, done in share.items()}
    if rank == 0:
        mark_complete(root, step, state, {name: files[name] for name in names})
    distributed.barrier()
    return path


def mark_complete(root: Path, step: int, state: RunState, files: dict[str, tuple[int, str]]) -> None:
    """Rank 0, once every file of the step's checkpoint is durable: state.json with the manifest
    of ``files`` ({name: (size, checksum)}), then ``latest``, each written atomically."""
    manifest = {name: size for name, (size, _) in files.items()}
    checksums = {name: digest for name, (_, digest) in files.items()}
    path = root / tag_for(step)
    write_atomic(path / STATE, replace(state, manifest=manifest, checksums=checksums).to_json(), durable=True)
    write_atomic(root / LATEST, tag_for(step), durable=True)


def clear_older_save(path: Path, rank: int) -> None:
    """Remove an older save of this step (made before a resume from an earlier one): it is not
    complete again until this save's state.json, nor a mix of both. A collective."""
    if rank == 0 and path.exists():
        shutil.rmtree(path)
    distributed.barrier()


def flushed_and_hashed(path: Path, names: list[str]) -> dict[str, tuple[int, str]]:
    """(size, checksum) of each named file of the checkpoint at ``path``, each made durable first:
    on disk before state.json says the checkpoint is complete."""
    done = {}
    for name in names:
        with open(path / name, "rb") as fh:
            os.fsync(fh.fileno())
            done[name] = (os.fstat(fh.fileno()).st_size, checksum(path / name))
    return done


def reason(e: Exception) -> str:
    # Any exception: torch's writer reports a full disk as RuntimeError ("unexpected pos").
    return e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip().splitlines() or [repr(e)])[0]


def agree_or_remove(failed: str | None, path: Path, rank: int, other: str) -> None:
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
