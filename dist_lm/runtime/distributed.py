"""The process group: ``init_process_group`` exports the standard variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) that DeepSpeed and torch read, for the launch that
dist_lm.runtime.launch detected, then starts the group: NCCL on GPUs, gloo on CPU; and the few
collectives over a CPU group that control decisions need.
"""

from __future__ import annotations

import os
import socket
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from dist_lm.config.schema import UserError
from dist_lm.runtime.launch import DistEnv

# The backends' own collective timeouts come this long after the watchdog's deadline
# (dist_lm.train.watchdog), so that its line naming the rank comes first.
BACKEND_GRACE = timedelta(minutes=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_for(d: DistEnv) -> torch.device:
    """One process per GPU: local rank i drives cuda:i. CPU when there is no GPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if d.local_rank >= count:
        raise UserError(
            f"launch environment: local rank {d.local_rank} but only {count} GPUs are visible; "
            f"start at most {count} ranks per node (check CUDA_VISIBLE_DEVICES)"
        )
    return torch.device("cuda", d.local_rank)


def init_process_group(d: DistEnv, device: torch.device, timeout_minutes: float) -> int:
    """Export the standard variables and start the default process group and the control group.
    Their collectives time out ``timeout_minutes`` plus a grace after the watchdog's deadline
    (dist_lm.train.watchdog), which ends a hang first, with a line naming the rank. Returns the port
    of the rendezvous store."""
    port = d.master_port or free_port()
    os.environ.update(
        RANK=str(d.rank),
        WORLD_SIZE=str(d.world_size),
        LOCAL_RANK=str(d.local_rank),
        LOCAL_WORLD_SIZE=str(d.local_world_size),
        MASTER_ADDR=d.master_addr,
        MASTER_PORT=str(port),
    )
    kwargs = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if d.world_size > 1:
            kwargs["device_id"] = device  # binds NCCL to our GPU up front, as DeepSpeed does
        else:
            # DeepSpeed leaves one-rank jobs unbound (a bound single rank has no peer for
            # ncclCommSplit); torch then warns at every barrier about a choice there isn't.
            warnings.filterwarnings("ignore", message=r"barrier\(\): using the device under current context")
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(minutes=timeout_minutes) + BACKEND_GRACE
    # DeepSpeed makes its own groups (ZeRO's data-parallel group is one) with torch's default
    # timeout, 10 minutes under NCCL: NCCL's abort would then end a hang before the watchdog's line,
    # or a legitimate wait longer than 10 minutes. Every group of this process gets ours.
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    dist.init_process_group(backend, rank=d.rank, world_size=d.world_size, timeout=timeout, **kwargs)
    global _control
    _control = dist.new_group(backend="gloo", timeout=timeout)  # a collective: every rank creates it here
    return port


# A CPU (gloo) group for control decisions (stop, save failed, ...): agreeing on a flag costs no
# host-device sync and never queues behind the GPU's work.
_control = None


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on some rank (a collective)."""
    return any_rank_each([flag])[0]


def any_rank_each(flags: list[bool]) -> list[bool]:
    """Each of ``flags`` True on every rank if it is True on some rank: one collective for all,
    over the CPU control group (no host-device sync). Alone, a rank has nothing to ask: the
    training loop calls this every step, and gloo's all-reduce over one rank still costs a
    quarter of a millisecond."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(_control) == 1:
        return list(flags)
    t = torch.tensor([1.0 if flag else 0.0 for flag in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return [bool(x) for x in t.tolist()]


def from_rank0(value):
    """Rank 0's ``value`` on every rank (a collective; any picklable value)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def all_gather_objects(value) -> list:
    """Every rank's ``value`` (any picklable value), in rank order, on every rank (a collective
    over the CPU control group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value, group=_control)
    return everyone


def first_problem(problem: str | None) -> str | None:
    """The first rank's problem, in rank order, on every rank; None if no rank has one (a
    collective): each rank checks its share of something, and all agree on the answer."""
    return next((p for p in all_gather_objects(problem) if p is not None), None)


def all_gather_floats(values: list[float]) -> list[list[float]]:
    """Every rank's ``values`` (the same length on each), in rank order (a collective). Exact for
    float32 values: they travel as float64."""
    if not (dist.is_available() and dist.is_initialized()):
        return [list(values)]
    mine = torch.tensor(values, dtype=torch.float64)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine, group=_control)
    return [t.tolist() for t in everyone]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=_control)


def teardown() -> None:
    """Leave together: a rank that exits while gloo's threads still talk can abort at shutdown."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def leave_alone() -> None:
    """Leave after a failure on this rank alone (teardown's barrier could wait forever for the
    others). Alone in the job, close the process group, or torch warns of a leak at exit; with
    others, leave it to the launcher, which ends them once this process is gone."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() == 1:
        dist.destroy_process_group()


def is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def rank() -> int:
    """This process's rank in the process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The process group's size (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
