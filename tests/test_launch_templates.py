"""The launch templates in launchers/, run as a user runs them, each starting real processes:
torchrun on one node and on two "nodes" over loopback, the deepspeed launcher with a hostfile,
and Open MPI's mpirun. Losses must match the one-process plain-PyTorch reference."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import BIN, ROOT, assert_ok, free_port, read_metrics
from reference import reference_losses

STEPS = 4
COMMON = [
    f"train.max_steps={STEPS}",
    "train.log_interval=1",
    "train.eval_interval=2",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "optim.warmup_steps=2",
    "logging.wandb=disabled",
]


@pytest.fixture(scope="module")
def reference(cache_dir) -> list[float]:
    os.environ["DIST_LM_CACHE"] = str(cache_dir)
    return reference_losses("debug", COMMON, STEPS)


def template(name: str, args: list[str], env: dict, **extra_env) -> subprocess.Popen:
    # PYTHON: the interpreter running the tests, whatever venv that is.
    return subprocess.Popen(
        [str(ROOT / "launchers" / name), *args],
        env={**env, "PYTHON": str(BIN / "python"), **extra_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def finish(proc: subprocess.Popen, timeout: int = 300) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def losses(run_dir) -> list[float]:
    train, evals = read_metrics(run_dir)
    assert [r["step"] for r in evals] == [2, 4]
    return [r["loss"] for r in train]


def test_torchrun_template_one_node(env, ds_ops, reference, tmp_path):
    proc = finish(
        template("torchrun.sh", ["--config", "debug", *COMMON, f"run.dir={tmp_path}"], env, NPROC_PER_NODE="2")
    )
    assert_ok(proc)
    assert "launcher=torchrun world_size=2 nodes=1" in proc.stdout
    assert losses(tmp_path) == pytest.approx(reference, abs=1e-4)


def own_address() -> str:
    """This machine's first non-loopback IPv4 address: what another node would dial. (A
    multi-node job refuses a loopback MASTER_ADDR, which other nodes could not reach.)"""
    import ipaddress
    import socket

    import psutil

    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                return a.address
    pytest.fail("this machine has no non-loopback IPv4 address for a two-node job to meet at")


def test_torchrun_template_two_nodes_on_one_machine(env, ds_ops, reference, tmp_path):
    """Two torchrun invocations, one rank each, meeting at MASTER_ADDR: one job of two nodes."""
    nodes = dict(NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR=own_address(), MASTER_PORT=str(free_port()))
    args = ["--config", "debug", *COMMON, f"run.dir={tmp_path}", "parallel.zero_stage=2"]
    procs = [template("torchrun.sh", args, env, NODE_RANK=str(rank), **nodes) for rank in (0, 1)]
    results = [finish(p) for p in procs]
    for r in results:
        assert_ok(r)
    assert "launcher=torchrun world_size=2 nodes=2 ranks_per_node=1" in results[0].stdout
    assert losses(tmp_path) == pytest.approx(reference, abs=1e-4)


def test_torchrun_template_needs_node_rank_for_many_nodes(env, tmp_path):
    proc = finish(template("torchrun.sh", ["--config", "debug"], env, NNODES="2", MASTER_ADDR="127.0.0.1"))
    assert proc.returncode != 0 and "set NODE_RANK" in proc.stderr


def test_deepspeed_template_with_a_hostfile(env, ds_ops, reference, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    proc = finish(
        template(
            "deepspeed.sh",
            ["--config", "debug", *COMMON, f"run.dir={tmp_path / 'run'}"],
            env,
            HOSTFILE=str(hostfile),
            MASTER_PORT=str(free_port()),
        )
    )
    assert_ok(proc)
    assert "launcher=deepspeed world_size=2" in proc.stdout
    assert losses(tmp_path / "run") == pytest.approx(reference, abs=1e-4)


@pytest.mark.skipif(shutil.which("pdsh") is not None, reason="checks the message given when pdsh is missing")
def test_deepspeed_template_across_nodes_needs_pdsh(env, tmp_path):
    proc = finish(
        template(
            "deepspeed.sh", ["--config", "debug"], env, HOSTS="node0 node1", GPUS_PER_NODE="8", MASTER_ADDR="node0"
        )
    )
    assert proc.returncode == 2 and "reaches other nodes with pdsh; install it" in proc.stderr
    assert "node0 slots=8" in proc.stdout and "node1 slots=8" in proc.stdout  # the hostfile it wrote


@pytest.mark.skipif(
    shutil.which("mpirun") is None,
    reason="mpirun not found: apt-get install openmpi-bin (make test installs it when run as root)",
)
def test_mpirun_template(env, ds_ops, reference, tmp_path):
    proc = finish(template("mpirun.sh", ["--config", "debug", *COMMON, f"run.dir={tmp_path}"], env, NP="2"))
    assert_ok(proc)
    assert "launcher=openmpi world_size=2" in proc.stdout
    assert losses(tmp_path) == pytest.approx(reference, abs=1e-4)
