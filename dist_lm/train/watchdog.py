"""Ending a job whose ranks stopped answering: in bounded time, with one line that names the rank.

Each rank runs one daemon thread that does two things:

- **A heartbeat.** Every BEAT_SECONDS it writes to the rendezvous store (the TCPStore at
  MASTER_ADDR:MASTER_PORT that every launcher starts: torchrun's agent hosts it, otherwise rank 0)
  what this rank is doing, at which step, and the time. A rank that died, or that was stopped
  (SIGSTOP, a frozen node), stops beating; one whose main thread is stuck in a collective or a
  CUDA kernel still beats, and says what it is doing.
- **A deadline.** The main thread marks progress (each step, each evaluation batch, the start and
  end of a save). When it made none for ``parallel.timeout_minutes`` (during a save,
  ``checkpoint.save_timeout_minutes``), the thread reads every rank's heartbeat, prints one line
  naming the ranks that went silent (or, when all still beat, what each is doing), and ends the
  process with status 3 (``Exit.HANG``). The next start resumes from the last complete checkpoint.

The backends' own collective timeouts (NCCL's watchdog, gloo's) are set a minute later
(dist_lm.runtime.distributed.BACKEND_GRACE), so a hang ends with this line rather than NCCL's abort;
they still bound the set-up, before the deadline is armed. A collective that fails at once because a
peer's process is gone (gloo: "Connection reset by peer") raises in the main thread instead;
:func:`explain` turns that into the same line.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from dist_lm.train.exits import Exit

BEAT_SECONDS = 2.0
# A rank whose newest heartbeat is older than this has stopped answering. Several beats, so that
# a busy store or a clock a second off between nodes does not make a live rank look silent.
SILENT_SECONDS = 10.0
STORE_TIMEOUT = timedelta(seconds=10)  # a store that does not answer in this time is gone too
KEY = "dist_lm/heartbeat/{}"


@dataclass(frozen=True)
class Mark:
    """What the main thread does now, since when, and how long it may take before the next mark."""

    doing: str  # e.g. "training step 12"
    since: float  # time.monotonic()
    allowance_s: float | None  # None: not armed (set-up)
    setting: str


class Watchdog:
    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, timeout_s: float):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.where = f"{master_addr}:{master_port}"
        self.identity = {"host": socket.gethostname(), "pid": os.getpid()}
        self._mark = Mark("setting up", time.monotonic(), None, "parallel.timeout_minutes")
        self._store = None
        self.how_to_continue = "run the same command again to continue from it"
        """The end of the line a hang ends with (the session names the run once it has a name)."""
        if world_size > 1:
            import torch.distributed as dist

            self._store = dist.TCPStore(
                master_addr, master_port, is_master=False, timeout=STORE_TIMEOUT, wait_for_workers=False
            )
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dist-lm-watchdog", daemon=True)
        self._beat()
        self._thread.start()

    # ---------------------------------------------------------------- called by the main thread
    def progress(self, doing: str, allowance_s: float | None = None, setting: str = "parallel.timeout_minutes") -> None:
        """The main thread is now ``doing`` (e.g. "training step 12"); its next mark is due within
        ``allowance_s`` (default: parallel.timeout_minutes, named by ``setting`` in the message)."""
        self._mark = Mark(doing, time.monotonic(), allowance_s or self.timeout_s, setting)  # one assignment

    def stop(self) -> None:
        self._stopped.set()

    def explain(self, error: BaseException) -> str | None:
        """The line to end with when ``error`` (raised by a collective) came from a rank that stopped
        answering; None when every other rank still answers (then it is a bug: keep its traceback).
        A peer that died a moment ago still looks alive: wait until its heartbeat is stale."""
        if self._store is None:
            return None
        deadline = time.monotonic() + SILENT_SECONDS + 2 * BEAT_SECONDS
        while True:
            silent, _ = self._peers()
            if silent or time.monotonic() > deadline:
                break
            time.sleep(BEAT_SECONDS)
        if not silent:
            return None
        mark = self._mark
        return (
            f"error: rank {self.rank}: a collective failed ({type(error).__name__}) while {mark.doing}; "
            f"{'; '.join(silent)}; exiting with status {int(Exit.HANG)}. {self._intact()}"
        )

    def _intact(self) -> str:
        return f"The last complete checkpoint is intact: {self.how_to_continue}."

    # --------------------------------------------------------------------------- the thread
    def _run(self) -> None:
        while not self._stopped.wait(BEAT_SECONDS):
            self._beat()
            mark = self._mark
            if mark.allowance_s is not None and time.monotonic() - mark.since > mark.allowance_s:
                self._fire(mark)

    def _beat(self) -> None:
        if self._store is None:
            return
        mark = self._mark
        try:
            self._store.set(KEY.format(self.rank), json.dumps({"t": time.time(), "doing": mark.doing, **self.identity}))
        except Exception:  # noqa: BLE001 - the store's host may be gone: _peers says so
            pass

    def _fire(self, mark: Mark) -> None:
        silent, busy = self._peers()
        peers = "; ".join(silent) if silent else (f"every other rank still answers ({', '.join(busy)})" if busy else "")
        print(
            f"error: rank {self.rank}: no progress for {mark.allowance_s / 60:g} minutes ({mark.setting}) "
            f"while {mark.doing}"
            + (f"; {peers}" if peers else "")
            + f"; exiting with status {int(Exit.HANG)}. {self._intact()}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(Exit.HANG)  # the main thread is stuck: nothing that waits on it can run

    def _peers(self) -> tuple[list[str], list[str]]:
        """(the other ranks that stopped answering, what the answering ones are doing), as phrases."""
        if self._store is None:
            return [], []
        silent, busy = [], {}
        now = time.time()
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            try:
                beat = json.loads(self._store.get(KEY.format(rank))) if self._store.check([KEY.format(rank)]) else None
            except Exception:  # noqa: BLE001 - a store that does not answer is itself the news
                return [
                    f"the rendezvous store at {self.where} does not answer: rank 0 (which hosts it unless "
                    "torchrun's agent does) stopped answering"
                ], []
            if beat is None:
                silent.append(f"rank {rank} never sent a heartbeat")
            elif now - beat["t"] > SILENT_SECONDS:
                silent.append(
                    f"rank {rank} (pid {beat['pid']} on {beat['host']}) stopped answering (its last "
                    f"heartbeat, {now - beat['t']:.0f} s ago, said: {beat['doing']})"
                )
            else:
                busy.setdefault(beat["doing"], []).append(rank)
        return silent, [f"{_ranks(ranks)} {doing}" for doing, ranks in busy.items()]


def _ranks(ranks: list[int]) -> str:
    return (
        f"rank {ranks[0]}"
        if len(ranks) == 1
        else f"ranks {ranks[0]}-{ranks[-1]}"
        if ranks == list(range(ranks[0], ranks[-1] + 1))
        else "ranks " + ",".join(map(str, ranks))
    )


_current: Watchdog | None = None


def start(rank: int, world_size: int, master_addr: str, master_port: int, timeout_s: float) -> Watchdog:
    """This process's watchdog (one per process), started once the process group is up."""
    global _current
    if _current is not None:
        _current.stop()
    _current = Watchdog(rank, world_size, master_addr, master_port, timeout_s)
    return _current


def stop() -> None:
    """Stop this process's watchdog, if it has one."""
    if _current is not None:
        _current.stop()


def explain(error: BaseException) -> str | None:
    """:meth:`Watchdog.explain` of this process's watchdog; None when there is none."""
    return _current.explain(error) if _current is not None else None
