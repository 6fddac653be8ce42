"""``checkpoint.async_save``: a save that holds training only while the state is copied to host
memory; a thread per rank writes the files while training goes on, and the checkpoint becomes
complete (state.json, then ``latest`` and ``best``) only once every rank's files are written,
flushed and hashed, exactly as a synchronous save (dist_lm.train.checkpoint) makes it complete.

Why not DeepSpeed's DecoupledCheckpointEngine (deepspeed.runtime.checkpoint_engine): it hands
the live GPU tensors to a writer process and commits at the next optimizer step, waiting there
for the whole write, because the step would change the tensors being written. A save that takes
longer than a step (35 s at 1.1B against steps of a few seconds, docs/benchmarks.md) would then
still stall training for most of its length. Why not torch's async DCP: DeepSpeed's optimizer
state (BF16_Optimizer's flat partitions, ZeRO's shards) is not a DCP state dict, and every tool
reads DeepSpeed's layout. So the copy is ours: DeepSpeed's own save runs as always, through a
checkpoint engine whose ``save`` copies each state dict to host memory instead of writing it
(dist_lm.runtime.engine.StagingEngine).

What it costs: host memory for one more copy of this rank's share of the checkpoint (the
optimizer's share and the weights of this rank), held from the first save to the end of the run
so that later saves copy into memory that is there and, on a GPU, pinned
(dist_lm.runtime.host_buffers); and one small all-reduce per step while a save is in flight, to
agree that every rank has finished. Where the node's memory is short, a state dict is written in
place rather than copied (dist_lm.runtime.hardware.HOST_MEMORY_RESERVE), with a warning. A fault
during the write leaves a directory without state.json, which no resume takes
(docs/reliability.md).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dist_lm.files import write_atomic
from dist_lm.observe import log
from dist_lm.runtime import distributed
from dist_lm.runtime.engine import StagingEngine
from dist_lm.runtime.hardware import HOST_MEMORY_RESERVE
from dist_lm.store.checkpoints import WEIGHTS, CheckpointError, tag_for
from dist_lm.store.state import STATE, RunState
from dist_lm.train import checkpoint
from dist_lm.train.checkpoint import Engine


@dataclass
class PendingSave:
    """A save whose files this rank's thread is writing."""

    path: Path
    step: int
    state: RunState
    started: float
    thread: threading.Thread | None = None
    written: dict[str, tuple[int, str]] = field(default_factory=dict)
    """This rank's files, by name in the checkpoint: (size, checksum) once flushed."""
    failure: str | None = None


def start(
    engine: Engine,
    staging: StagingEngine,
    root: Path,
    step: int,
    state: RunState,
    rank: int,
    weights: Callable[[], dict],
    aliases: dict[str, str],
) -> PendingSave:
    """Stage a save on every rank (a collective: DeepSpeed's save and the weights' gather) and
    start this rank's writer thread. Training may go on as soon as this returns. ``weights``
    gives copies this save owns (in ``staging.buffers``): training changes no tensor the thread
    writes."""
    path = root / tag_for(step)
    pending = PendingSave(path, step, state, time.perf_counter())
    failed = None
    try:
        checkpoint.clear_older_save(path, rank)
        staging.staged, staging.written = [], []
        try:
            engine.save_checkpoint(str(root), tag=tag_for(step), save_latest=False)
        finally:
            files, staging.staged = staging.staged, None
        in_place = [Path(file) for file, _ in staging.written]
        tensors = weights()
        rng = json.dumps(checkpoint.rng_state())
    except Exception as e:
        failed = f"rank {rank}: staging {path} failed: {checkpoint.reason(e)}"
    checkpoint.agree_or_remove(failed, path, rank, "another rank could not stage the checkpoint")
    if short := distributed.first_problem(_short_of_memory(staging.written, rank) if staging.written else None):
        log.warn(short)
    pending.thread = threading.Thread(
        target=_write,
        args=(pending, files, in_place, tensors, rng, rank, aliases),
        name=f"save {path.name}",
        daemon=True,
    )
    pending.thread.start()
    return pending


def _short_of_memory(written: list[tuple[str, int]], rank: int) -> str:
    nbytes = sum(n for _, n in written)
    return (
        f"checkpoint.async_save: rank {rank} wrote {len(written)} of its checkpoint files ({nbytes / 1e9:.1f} GB) "
        f"before training went on: copying them for every rank of its node would have left less than "
        f"{HOST_MEMORY_RESERVE:.0%} of the node's memory free"
    )


def _write(
    pending: PendingSave, files, in_place: list[Path], tensors: dict, rng: str, rank: int, aliases: dict[str, str]
) -> None:
    """This rank's share of the save: the staged state dicts, the weights and the RNG written,
    then these and ``in_place`` (written by the trainer while staging) flushed and hashed."""
    path = pending.path
    try:
        for state_dict, file in files:
            torch.save(state_dict, file)
        checkpoint.write_weights(path, rank, tensors, aliases)
        write_atomic(path / f"rng-rank{rank}.json", rng, durable=True)
        names = [str(Path(file).relative_to(path)) for _, file in files] + [f"rng-rank{rank}.json"]
        names += [str(file.relative_to(path)) for file in in_place]
        names += [WEIGHTS.format(rank=rank)] if (path / WEIGHTS.format(rank=rank)).is_file() else []
        pending.written = checkpoint.flushed_and_hashed(path, sorted(set(names)))
    except Exception as e:  # a full or failing disk: the main thread agrees on it with the others
        pending.failure = f"rank {rank}: writing {path} failed: {checkpoint.reason(e)}"


def finish(pending: PendingSave, root: Path, rank: int, wait: bool, timeout_s: float) -> bool:
    """Complete ``pending`` if every rank's thread is done (a collective; with ``wait``, after
    this rank's is): rank 0 hashes what no thread wrote (DeepSpeed's own copies, such as its
    recovery script), writes state.json and moves ``latest``. False while some rank is still
    writing. A failure or a write past ``timeout_s`` on any rank removes the checkpoint and
    raises CheckpointError on every rank."""
    assert pending.thread is not None
    if wait:
        pending.thread.join(max(0.0, timeout_s - (time.perf_counter() - pending.started)))
    running = pending.thread.is_alive()
    if running and time.perf_counter() - pending.started > timeout_s:
        pending.failure = (
            f"rank {rank}: writing {pending.path} took more than checkpoint.save_timeout_minutes "
            f"({timeout_s / 60:g} min)"
        )
        running = False
    still_running, failed = distributed.any_rank_each([running, pending.failure is not None])
    if failed:  # every rank: removes the directory and raises
        checkpoint.agree_or_remove(pending.failure, pending.path, rank, "another rank could not write the checkpoint")
    if still_running:
        return False
    files = {name: done for share in distributed.all_gather_objects(pending.written) for name, done in share.items()}
    if rank == 0:
        path = pending.path
        names = sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.is_file() and f.name != STATE)
        files |= checkpoint.flushed_and_hashed(path, [n for n in names if n not in files])
        checkpoint.mark_complete(root, pending.step, pending.state, {name: files[name] for name in names})
    distributed.barrier()
    return True


__all__ = ["CheckpointError", "PendingSave", "finish", "start"]
