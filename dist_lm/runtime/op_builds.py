"""DeepSpeed's C++ ops that build on first use: which a run needs, whether they can build here,
and the lock file of their build directory that a dead process left behind.

DeepSpeed builds these ops through torch.utils.cpp_extension, which guards each op's build
directory with a lock file (torch.utils.file_baton.FileBaton). Every process that loads the op
creates it, has ninja check the build, and removes it; a process that finds it waits, with no
time limit, until it is gone. A process killed while it holds it (SIGKILL, the OOM killer, a
timeout's kill during start-up) leaves the file for good, and from then on every run that loads
the op waits forever at start and says nothing (CI's run of 2026-12-07 ran into its 90-minute
limit that way: docs/reliability.md).

So a lock is taken as left behind, and removed with a warning, when no process of this node holds
it open (the holder keeps the file open until it removes it; /proc says who does; looked at twice,
RECHECK_S apart, as the holder closes it an instant before removing it) and it is older than a
holder keeps it:
- LEFT_AFTER_S on this node's own disk. A load holds the lock about a second (ninja's check);
  the age is for a holder this node's /proc does not show, a process of another container that
  shares the directory. What it still misjudges: such a process building the op for over a minute.
- SHARED_LEFT_AFTER_S where the directory is on a file system other nodes may share (NFS,
  Lustre, GPFS ...), where a process of another node may be building: longer than any of these
  builds takes (CPU Adam: 2-3 minutes on one core).
Torch itself offers no way out of the wait.

The loading itself is DeepSpeed's (dist_lm.runtime.engine.load_ops), past wait_for_lock.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from dist_lm.config.schema import ParallelConfig, UserError

LOCK = "lock"  # torch.utils.cpp_extension's name for it, in each op's build directory
RECHECK_S = 1.0
LEFT_AFTER_S = 60
SHARED_LEFT_AFTER_S = 10 * 60
WAIT_POLL_S = 0.5
# File systems of this node alone. Anything else (nfs, lustre, gpfs, beegfs, cifs, fuse ...) is
# taken as one other nodes may share.
NODE_LOCAL_FILE_SYSTEMS = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "bcachefs", "tmpfs", "ramfs", "overlay"}
)
# The ops our runs load, by op builder (DeepSpeed's name) and build directory (torch's).
SHARED_MEMORY_COMM = ("ShareMemCommBuilder", "deepspeed_shm_comm")
CPU_ADAM = ("CPUAdamBuilder", "cpu_adam")


def extensions_root() -> Path:
    """Where torch builds and looks for its extensions: TORCH_EXTENSIONS_DIR, or its default."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory("", verbose=False))


def ops_needed(device: torch.device, parallel: ParallelConfig) -> list[tuple[str, str]]:
    """The ops DeepSpeed loads for this run, (builder, build directory): a CPU run's shared-memory
    collectives, optimizer offload's CPU Adam."""
    return ([SHARED_MEMORY_COMM] if device.type == "cpu" else []) + ([CPU_ADAM] if parallel.offload_optimizer else [])


def ops_to_build(device: torch.device, parallel: ParallelConfig) -> list[str]:
    """Those of ``ops_needed`` that are not in torch's extension cache yet. Their build is a
    silence of 40-105 s before the first step on two cores, which the log announces. (torch builds
    again when another environment of the same user built them last; that is not seen here.)"""
    try:
        root = extensions_root()
    except (OSError, AttributeError):  # a torch without it: say nothing rather than guess
        return []
    return [name for _, name in ops_needed(device, parallel) if not (root / name / f"{name}.so").is_file()]


def check_cpu_adam() -> None:
    """Optimizer offload steps with DeepSpeed's CPU Adam, a C++ op built on first use: say so
    before any process starts if it is neither prebuilt nor buildable here."""
    if importlib.util.find_spec("deepspeed.ops.adam.cpu_adam_op") is not None:
        return  # DeepSpeed was installed with its ops prebuilt (DS_BUILD_CPU_ADAM=1)
    from torch.utils.cpp_extension import is_ninja_available

    compiler = os.environ.get("CXX", "c++")
    missing = [
        what
        for what, ok in ((f"a C++ compiler ({compiler})", shutil.which(compiler)), ("ninja", is_ninja_available()))
        if not ok
    ]
    if missing:
        raise UserError(
            f"config error: parallel.offload_optimizer=true needs DeepSpeed's CPU Adam op, built on "
            f"first use, but {' and '.join(missing)} cannot be found; install them (apt-get install "
            "g++; pip install ninja) or set parallel.offload_optimizer=false"
        )


def clear_left_locks(root: Path | None = None) -> list[Path]:
    """Remove the lock of every op build directory under ``root`` (torch's extension root) that
    was left behind; the ones removed. At a run's start, for the ops that DeepSpeed loads on its
    own (dist_lm.runtime.engine.load_ops waits on those we load)."""
    if root is None:
        try:
            root = extensions_root()  # (torch makes the directory, as it would for a build)
        except OSError:  # a home that cannot be written holds no build, and no lock
            return []
    removed = []
    for lock in sorted(root.glob(f"*/{LOCK}")):
        if (seen := _identity(lock)) and left_behind(lock) and _remove(lock, seen):
            removed.append(lock)
    return removed


def wait_for_lock(lock: Path) -> None:
    """Return once ``lock`` is gone: removed by its holder, or by us once it is left behind."""
    said = False
    while (seen := _identity(lock)) is not None:
        if left_behind(lock):
            _remove(lock, seen)
            return
        if not said and _held_on_this_node(lock) is False:
            print(
                f"warning: waiting for {lock}: no process of this node holds it; it is taken as left behind once "
                f"{_left_after(lock) / 60:g} minute(s) old (a process of another node or container may be building "
                f"DeepSpeed's {lock.parent.name} op there)",
                file=sys.stderr,
                flush=True,
            )
            said = True
        time.sleep(WAIT_POLL_S)


def left_behind(lock: Path) -> bool:
    """Whether ``lock`` has no holder: none on this node (looked at twice), none elsewhere for
    longer than a holder keeps it (_left_after)."""
    seen = _identity(lock)
    if seen is None or _held_on_this_node(lock) is not False or time.time() - seen[2] <= _left_after(lock):
        return False
    time.sleep(RECHECK_S)  # a holder that closed it is about to remove it
    return _identity(lock) == seen and _held_on_this_node(lock) is False


def _left_after(lock: Path) -> float:
    """The age past which a lock that no process of this node holds is taken as left behind."""
    return LEFT_AFTER_S if _on_node_local_file_system(lock) else SHARED_LEFT_AFTER_S


def _identity(lock: Path) -> tuple[int, int, float] | None:
    """(device, inode, modification time): what tells one lock file from a later one of the same name."""
    try:
        st = lock.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime


def _remove(lock: Path, seen: tuple[int, int, float]) -> bool:
    """Remove ``lock`` if it is still the file looked at, and say so; whether this call did."""
    if _identity(lock) != seen:
        return False
    try:
        lock.unlink()
    except FileNotFoundError:  # another rank of this node removed it first
        return False
    print(
        f"warning: removed {lock}: a process that died while building or loading DeepSpeed's {lock.parent.name} "
        "op left it there, and every later run that loads the op would have waited for it forever",
        file=sys.stderr,
        flush=True,
    )
    return True


def _held_on_this_node(lock: Path) -> bool | None:
    """Whether a process of this node has ``lock`` open; None where that cannot be seen (no /proc,
    or a process of the lock's owner whose open files we may not read)."""
    target = os.path.realpath(lock)
    try:
        owner = lock.stat().st_uid
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            if os.stat(f"/proc/{pid}").st_uid != owner:
                continue
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:  # ended meanwhile
            continue
        except PermissionError:
            return None
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return True
    return False


def _on_node_local_file_system(path: Path) -> bool:
    """Whether ``path`` is on a file system of this node alone (the longest mount point above it
    in /proc/self/mounts); False where that cannot be read."""
    target, best, fs_type = os.path.realpath(path), "", None
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount_point = fields[1].replace("\\040", " ")
                inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best):
                    best, fs_type = mount_point, fields[2]
    except OSError:
        return False
    return fs_type in NODE_LOCAL_FILE_SYSTEMS
