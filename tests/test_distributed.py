"""Launcher detection from each launcher's environment (a pure function of the environment)."""

from __future__ import annotations

import pytest

from dist_lm.config.schema import UserError
from dist_lm.runtime.launch import detect


def test_no_launcher_is_one_process():
    d = detect({})
    assert (d.launcher, d.rank, d.world_size, d.local_rank) == ("none", 0, 1, 0)


def test_torchrun():
    d = detect(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "node0",
            "MASTER_PORT": "1234",
            "TORCHELASTIC_RUN_ID": "x",
        }
    )
    assert (d.launcher, d.rank, d.world_size, d.local_rank, d.num_nodes) == ("torchrun", 3, 8, 1, 4)
    assert (d.master_addr, d.master_port) == ("node0", 1234)


def test_deepspeed_launcher():
    env = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "LOCAL_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29501",
    }
    d = detect({**env, "CROSS_RANK": "0", "CROSS_SIZE": "1"})
    assert (d.launcher, d.rank, d.local_world_size) == ("deepspeed", 1, 2)
    assert detect(env).launcher == "env"  # the same variables set by hand: no launcher to name


def test_open_mpi_single_node():
    d = detect(
        {
            "OMPI_COMM_WORLD_RANK": "1",
            "OMPI_COMM_WORLD_SIZE": "2",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        }
    )
    assert (d.launcher, d.rank, d.world_size, d.master_addr) == ("openmpi", 1, 2, "127.0.0.1")


def test_open_mpi_multi_node_needs_master_addr():
    env = {
        "OMPI_COMM_WORLD_RANK": "5",
        "OMPI_COMM_WORLD_SIZE": "8",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
    }
    with pytest.raises(UserError, match="MASTER_ADDR"):
        detect(env)
    assert detect({**env, "MASTER_ADDR": "n0"}).num_nodes == 2


def test_mpich():
    d = detect({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2", "MASTER_ADDR": "h"})
    assert (d.launcher, d.rank, d.local_rank, d.num_nodes) == ("mpich", 2, 0, 2)


def test_srun_tasks_but_not_the_batch_script():
    step = {
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_STEP_NUM_NODES": "2",
        "MASTER_ADDR": "n1",
    }
    d = detect(step)
    assert (d.launcher, d.rank, d.local_rank, d.world_size, d.num_nodes) == ("slurm", 3, 1, 4, 2)
    assert detect({"SLURM_PROCID": "0", "SLURM_JOB_ID": "7"}).launcher == "none"


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"RANK": "0", "WORLD_SIZE": "2"}, "LOCAL_RANK is not"),
        ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK='x' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "outside world size"),
    ],
)
def test_broken_environments_name_the_variable(env, fragment):
    with pytest.raises(UserError, match=fragment):
        detect(env)
