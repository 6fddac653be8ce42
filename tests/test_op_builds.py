"""A lock file that a process killed while building or loading a DeepSpeed op left in its build
directory (dist_lm.runtime.op_builds): torch would wait on it forever; a run removes it, and only
it. The holders are real processes holding torch's own FileBaton. The launch that meets such a
lock is test_engine_launchers.py::test_deepspeed_launcher_matches_reference."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from conftest import age_file as age
from conftest import hold_build_lock
from dist_lm.runtime import op_builds


@pytest.fixture(autouse=True)
def quick_recheck(monkeypatch):
    """The second look at a lock with no holder, 0.2 s after the first rather than 1 s."""
    monkeypatch.setattr(op_builds, "RECHECK_S", 0.2)


def test_a_lock_whose_holder_was_killed_is_removed_and_a_held_one_is_not(tmp_path, capsys):
    lock = tmp_path / "deepspeed_shm_comm" / op_builds.LOCK
    holder = hold_build_lock(lock)
    try:
        age(lock, 2 * op_builds.LEFT_AFTER_S)  # a long build
        assert op_builds.clear_left_locks(tmp_path) == [] and lock.is_file()  # its holder is alive
    finally:
        holder.kill()
        holder.wait()
    assert lock.is_file()  # what torch would wait on forever
    age(lock, op_builds.LEFT_AFTER_S / 2)  # left moments ago: maybe a holder this node does not see
    assert op_builds.clear_left_locks(tmp_path) == [] and lock.is_file()
    age(lock, 2 * op_builds.LEFT_AFTER_S)
    assert op_builds.clear_left_locks(tmp_path) == [lock] and not lock.exists()
    assert capsys.readouterr().err.splitlines() == [
        f"warning: removed {lock}: a process that died while building or loading DeepSpeed's deepspeed_shm_comm op "
        "left it there, and every later run that loads the op would have waited for it forever"
    ]
    assert op_builds.clear_left_locks(tmp_path) == []


def test_a_wait_on_a_lock_ends_when_its_holder_is_killed(tmp_path, monkeypatch, capsys):
    """The wait says once that no process holds the lock, and ends when it is LEFT_AFTER_S old
    (1 s here)."""
    monkeypatch.setattr(op_builds, "LEFT_AFTER_S", 1)
    lock = tmp_path / "cpu_adam" / op_builds.LOCK
    holder = hold_build_lock(lock)
    threading.Timer(0.5, holder.kill).start()  # while the wait goes on
    op_builds.wait_for_lock(lock)
    assert holder.wait() == -9 and not lock.exists()
    waiting, removed = capsys.readouterr().err.splitlines()
    assert waiting.startswith(f"warning: waiting for {lock}: no process of this node holds it; ")
    assert removed.startswith(f"warning: removed {lock}: ")


def test_on_a_file_system_other_nodes_share_a_lock_is_left_behind_later(tmp_path, monkeypatch):
    """A holder on another node is not seen in this node's /proc."""
    lock = tmp_path / "cpu_adam" / op_builds.LOCK
    lock.parent.mkdir()
    lock.touch()
    age(lock, 2 * op_builds.LEFT_AFTER_S)
    assert op_builds.left_behind(lock)  # tmp_path is on this node's disk
    monkeypatch.setattr(op_builds, "_on_node_local_file_system", lambda path: False)
    assert not op_builds.left_behind(lock)
    age(lock, op_builds.SHARED_LEFT_AFTER_S + 60)
    assert op_builds.left_behind(lock)


def test_the_file_system_is_read_from_the_mounts():
    assert op_builds._on_node_local_file_system(Path("/dev/shm"))  # tmpfs
    assert not op_builds._on_node_local_file_system(Path("/proc/self"))  # not one we know as local
