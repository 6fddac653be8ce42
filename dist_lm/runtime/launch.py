"""Which launcher started us, and our rank, local rank and world size: the one module that reads
launcher environment variables. A pure function of the environment, and no torch: the training
command reads it before torch is imported, so that a config that cannot run on this many ranks
is refused at once. (The process group: dist_lm.runtime.distributed.)"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Mapping

from dist_lm.config.errors import ConfigError
from dist_lm.config.schema import ParallelConfig, UserError

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    launcher: str
    """torchrun, deepspeed, openmpi, mpich, slurm, env (RANK/WORLD_SIZE/... set by hand or by
    another tool), or none (one process, no launcher)."""
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    def describe(self) -> str:
        return (
            f"launcher={self.launcher} world_size={self.world_size} nodes={self.num_nodes} "
            f"ranks_per_node={self.local_world_size} master={self.master_addr}:{self.master_port}"
        )


def _int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UserError(
            f"launch environment: {name}={value!r} is not an integer; "
            "unset it or start through torchrun/deepspeed/mpirun/srun"
        ) from None


def detect(env: Mapping[str, str]) -> DistEnv:
    """Resolve the topology from whichever launcher's variables are present."""
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_MASTER_PORT
    addr = env.get("MASTER_ADDR", "127.0.0.1")

    if "RANK" in env or "WORLD_SIZE" in env:  # torchrun, the deepspeed launcher, or set by hand
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            if name not in env:
                raise UserError(
                    f"launch environment: RANK/WORLD_SIZE are set but {name} is not; "
                    "start through torchrun or deepspeed, or unset RANK and WORLD_SIZE"
                )
        # The deepspeed launcher also sets CROSS_RANK/CROSS_SIZE (its node rank and count).
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed" if "CROSS_RANK" in env else "env"
        world = _int(env, "WORLD_SIZE")
        local_world = (
            _int(env, "LOCAL_WORLD_SIZE")
            if "LOCAL_WORLD_SIZE" in env
            else (_int(env, "LOCAL_SIZE") if "LOCAL_SIZE" in env else world)
        )
        return _checked(DistEnv(launcher, _int(env, "RANK"), _int(env, "LOCAL_RANK"), world, local_world, addr, port))

    if "OMPI_COMM_WORLD_RANK" in env:
        return _checked(
            DistEnv(
                "openmpi",
                _int(env, "OMPI_COMM_WORLD_RANK"),
                _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"),
                _int(env, "OMPI_COMM_WORLD_SIZE"),
                _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE"),
                _mpi_master(env, _int(env, "OMPI_COMM_WORLD_SIZE") == _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE"), addr),
                port,
            )
        )

    if "PMI_RANK" in env:  # MPICH / Intel MPI (Hydra)
        world = _int(env, "PMI_SIZE")
        local_world = _int(env, "MPI_LOCALNRANKS") if "MPI_LOCALNRANKS" in env else world
        local_rank = _int(env, "MPI_LOCALRANKID") if "MPI_LOCALRANKID" in env else _int(env, "PMI_RANK") % local_world
        return _checked(
            DistEnv(
                "mpich",
                _int(env, "PMI_RANK"),
                local_rank,
                world,
                local_world,
                _mpi_master(env, world == local_world, addr),
                port,
            )
        )

    # srun's own tasks (one per GPU). A batch script itself (no step) is one plain process.
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        world = _int(env, "SLURM_STEP_NUM_TASKS")
        nodes = _int(env, "SLURM_STEP_NUM_NODES") if "SLURM_STEP_NUM_NODES" in env else 1
        if "MASTER_ADDR" not in env and nodes > 1:
            raise UserError(
                "launch environment: a multi-node srun needs MASTER_ADDR (the first host of "
                "$SLURM_JOB_NODELIST, as slurm/pretrain.sh sets it)"
            )
        return _checked(
            DistEnv(
                "slurm",
                _int(env, "SLURM_PROCID"),
                _int(env, "SLURM_LOCALID"),
                world,
                max(1, world // nodes),
                addr,
                port,
            )
        )

    return DistEnv("none", 0, 0, 1, 1, "127.0.0.1", port if "MASTER_PORT" in env else 0)


def _mpi_master(env: Mapping[str, str], single_node: bool, default: str) -> str:
    if "MASTER_ADDR" in env or single_node:
        return default
    raise UserError(
        "launch environment: a multi-node mpirun needs MASTER_ADDR (rank 0's host); "
        "pass it with -x MASTER_ADDR=<host> as launchers/mpirun.sh does"
    )


def _checked(d: DistEnv) -> DistEnv:
    if not (0 <= d.rank < d.world_size):
        raise UserError(f"launch environment: rank {d.rank} is outside world size {d.world_size}")
    if not (0 <= d.local_rank < max(1, d.local_world_size)):
        raise UserError(f"launch environment: local rank {d.local_rank} is outside {d.local_world_size} ranks per node")
    return d


def check_topology(parallel: ParallelConfig, d: DistEnv) -> None:
    """ZeRO++ hpZ keeps its secondary weight copy in groups of consecutive ranks, meant to be a
    node's (the planner gives it the GPUs per node): a group that does not fit within the ranks
    the launcher started on each node would gather across the link hpZ is there to avoid."""
    hpz = parallel.zero_hpz_partition_size
    if hpz > 1 and d.local_world_size % hpz:
        raise ConfigError(
            "parallel.zero_hpz_partition_size",
            f"{hpz} does not divide the {d.local_world_size} ranks per node of this launch ({d.num_nodes} "
            f"nodes): its groups would span nodes; use {d.local_world_size} or a divisor of it",
        )


def check_master_reachable(d: DistEnv) -> None:
    """On a multi-node job every node dials MASTER_ADDR: it must name this network, not loopback."""
    if d.num_nodes <= 1:
        return
    try:
        infos = socket.getaddrinfo(d.master_addr, d.master_port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise UserError(
            f"launch environment: MASTER_ADDR={d.master_addr} does not resolve on this node; "
            "set it to the first node's hostname or IP address"
        ) from None
    if all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos):
        raise UserError(
            f"launch environment: MASTER_ADDR={d.master_addr} is this machine's loopback address, "
            f"which the other {d.num_nodes - 1} node(s) cannot reach; set it to the first node's "
            "hostname or IP address"
        )
