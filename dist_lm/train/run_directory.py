"""The run directory: which it is (run.dir, or runs/<run.name>, or a name made for the run),
whether it can be a run's, and who owns it.

One process (one job's rank 0) owns a run directory at a time: an exclusive ``flock`` on
RUN_DIR/.lock, held while the process lives. Two runs writing one directory interleave
metrics.jsonl, delete each other's rows and leave config.yaml describing the wrong model. A
checkpoint.dir outside the run directory is locked the same way: two runs saving into one
would write the same stepNNNNNNNN directories.

The kernel drops the lock when its process dies however it dies (kill -9, a lost node), so a
SLURM requeue or a restart after a crash reuses the directory without anyone removing a file.

The lock file is also what marks a directory as a run's: a directory that holds files but no
lock is somebody else's (the current directory, runs/ itself, a user's project), and a run is
never started in it (:func:`problem_with_run_dir`).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shlex
import socket
import time
from pathlib import Path
from typing import IO

from dist_lm.config.io import to_yaml
from dist_lm.config.schema import Config, UserError, replaced
from dist_lm.files import write_atomic
from dist_lm.runtime import distributed

LOCK = ".lock"


class RunDirInUse(UserError):
    """Another live process holds the run directory."""


def problem_with_run_dir(run_dir: Path) -> str | None:
    """Why ``run_dir`` cannot be a run's directory, or None: it must be new, empty, or a run's
    (it has the lock file). Reads only."""
    if not run_dir.exists():
        return None
    if not run_dir.is_dir():
        return f"run error: {run_dir} is a file, not a directory; give the run another run.name or run.dir"
    if (run_dir / LOCK).is_file():
        return None
    entries = sorted(p.name for p in run_dir.iterdir())
    if not entries:
        return None
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    return (
        f"run error: {run_dir} holds files ({shown}) and is not a run directory (it has no {LOCK}); a run "
        "writes config.yaml, run.json, train.log and metrics there, so it starts only in a new or empty "
        "directory or its own: give another run.name or run.dir"
    )


def lock(run_dir: Path, what: str = "run.name or run.dir") -> IO[str]:
    """Take the directory's lock; the open file holds it (keep it until the process ends).
    Raises RunDirInUse, naming the holder, if another process has it. ``what``: the settings
    that give a run another directory, for the message."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunDirInUse(
            f"run error: {run_dir} is in use by another run (pid@host {holder}, holding "
            f"{run_dir / LOCK}); wait for it or stop it, or give this run another {what}"
        ) from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}@{socket.gethostname()}\n")
    handle.flush()
    return handle


def default_run_name(preset: str) -> str:
    """The config's name, the start time and six random hex digits: runs started in the same
    second (a sweep's, a job array's) get names of their own."""
    return f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def how_to_continue(given: Config, chosen: Config) -> str:
    """What a line that ends a run says to continue it (``given``: the config as the command gave
    it; ``chosen``: with_run_dir's). The same command does, where it named the run or its
    directory; a default name (the start time and random digits) is not part of the command."""
    if given.run.name is not None or given.run.dir is not None:
        return "run the same command again to continue from it"
    return f"run the same command with run.name={shlex.quote(chosen.run.name)} to continue from it"


def with_run_dir(cfg: Config) -> Config:
    """cfg with run.name and run.dir filled in, the same on every rank (rank 0's choice), once
    rank 0 has seen that the directory can be a run's (new, empty, or a run's own)."""
    name = cfg.run.name or default_run_name(cfg.preset)
    run_dir = cfg.run.dir_for(name)
    name, problem = distributed.from_rank0((name, problem_with_run_dir(run_dir)) if distributed.is_rank0() else None)
    if problem:
        raise UserError(problem)
    return replaced(cfg, "run", name=name, dir=str(cfg.run.dir_for(name)))


def root_of_its_own(ckpt_root: Path, run_dir: Path) -> bool:
    """Whether the checkpoint root is not simply the run directory's (checkpoint.dir names
    another place), so that it must be locked and may hold another run's checkpoints."""
    return ckpt_root.resolve() not in (run_dir.resolve() / "checkpoints", run_dir.resolve())


def take_run_dirs(cfg: Config, run_dir: Path, shared_root: Path | None) -> list[IO[str]]:
    """Take the run directory and a checkpoint.dir of its own (their locks:
    this module's lock), then write the config. Returns the locks, held by rank 0."""
    problem, locks = None, []
    if distributed.is_rank0():
        try:
            if shared_root is not None:
                locks.append(lock(shared_root, "checkpoint.dir"))
            locks.append(lock(run_dir))
        except RunDirInUse as e:
            problem = str(e)
            for held in locks:
                held.close()
    problem = distributed.from_rank0(problem)
    if problem:
        raise RunDirInUse(problem)
    if distributed.is_rank0():
        write_atomic(run_dir / "config.yaml", to_yaml(cfg))
    distributed.barrier()
    return locks
