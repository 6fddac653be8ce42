"""sbatch slurm/pretrain.sh on a real one-node SLURM cluster (started here, see slurm_cluster.py):
a job trains and leaves a checkpoint; USR1 to a running job makes it checkpoint, requeue
itself, and finish from where it stopped."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from conftest import ROOT, read_metrics
from slurm_cluster import Cluster, missing

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def sbatch(
    cluster: Cluster, env: dict, logs, *overrides: str, script: str = "slurm/pretrain.sh", launch: str = "srun"
) -> str:
    # On this CPU machine: two ranks, no GPUs; everything else from the script's #SBATCH lines.
    # slurm/pretrain.sh runs a task per rank (LAUNCH=srun); LAUNCH=torchrun and the deepspeed
    # variant one task that starts both.
    tasks = (
        ["--ntasks-per-node=2", "--cpus-per-task=1"]
        if script == "slurm/pretrain.sh" and launch == "srun"
        else ["--ntasks-per-node=1", "--cpus-per-task=2"]
    )
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            *tasks,
            "--gpus-per-node=0",
            f"--output={logs}/job-%j.out",
            script,
            "debug",
            "logging.wandb=disabled",
            *overrides,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**env, **cluster.env, "PYTHON": sys.executable, "GPUS_PER_NODE": "2", "LAUNCH": launch},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def test_sbatch_trains_and_leaves_a_checkpoint(cluster, env, ds_ops, tmp_path):
    job = sbatch(cluster, env, tmp_path, "train.max_steps=6", "train.log_interval=2", f"run.dir={tmp_path / 'run'}")
    info = cluster.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    log = (tmp_path / f"job-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "launcher=slurm world_size=2 nodes=1" in log
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step00000006"


def test_sbatch_with_the_deepspeed_launcher(cluster, env, ds_ops, tmp_path):
    job = sbatch(
        cluster,
        env,
        tmp_path,
        "train.max_steps=6",
        "train.log_interval=2",
        f"run.dir={tmp_path / 'run'}",
        script="slurm/pretrain_deepspeed.sh",
    )
    info = cluster.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    log = (tmp_path / f"job-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert f"hostfile {ROOT}/hostfile-{job}: {cluster.host} slots=2" in log
    assert "launcher=deepspeed world_size=2" in log
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step00000006"
    assert not (ROOT / f"hostfile-{job}").exists()  # removed at the end


def test_usr1_checkpoints_requeues_and_continues(cluster, env, ds_ops, tmp_path, script="slurm/pretrain.sh"):
    """Through torchrun (LAUNCH=torchrun), which would turn the ranks' 75 into its own 1 if the
    status did not come back through the status file (launchers/exit_status.sh)."""
    run = tmp_path / "run"
    # Another run's training process on the node (as another job of the same user would have): the
    # stop must pass it by. It dies of a USR1, which has no handler in it.
    bystander_script = tmp_path / "another" / "launchers" / "pretrain.py"
    bystander_script.parent.mkdir(parents=True)
    bystander_script.write_text("import time\ntime.sleep(900)\n")
    bystander = subprocess.Popen([sys.executable, str(bystander_script), "--config", "debug", "run.name=another-run"])
    try:
        _usr1_requeues_and_continues(cluster, env, tmp_path, run, script)
        assert bystander.poll() is None, f"another run's process ended with {bystander.returncode}"
    finally:
        bystander.kill()
        bystander.wait()


def _usr1_requeues_and_continues(cluster, env, tmp_path, run, script):
    job = sbatch(
        cluster,
        env,
        tmp_path,
        "train.max_steps=60",
        "train.log_interval=1",
        "train.eval_interval=0",
        f"run.dir={run}",
        script=script,
        launch="torchrun",
    )
    deadline = time.time() + 180
    while not ((run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert time.time() < deadline, (tmp_path / f"job-{job}.out").read_text()[-3000:]
        time.sleep(0.5)
    # What --signal=B:USR1@120 does before the time limit: USR1 to the batch script.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, env=cluster.env)
    deadline = time.time() + 180
    while cluster.job(job).get("Restarts") != "1":  # requeued
        assert time.time() < deadline, f"{cluster.job(job)}\n{(tmp_path / f'job-{job}.out').read_text()[-3000:]}"
        time.sleep(0.5)
    # SLURM holds a requeued job (Reason=BeginTime) for the credential lifetime, while the old
    # attempt's credential is revoked: 120 s by default, 10 s in the test cluster (cred_expire,
    # 5 at least). Releasing it sooner makes the new attempt fail at launch, so we wait.
    # Around a requeue slurmctld can show the cancelled attempt's end (FAILED, RunTime 0) for a
    # moment, even after the new attempt started: only COMPLETED counts, a real failure times out.
    try:
        info = cluster.wait(job, ("COMPLETED",), timeout=420)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{(tmp_path / f'job-{job}.out').read_text()[-3000:]}") from None
    log = (tmp_path / f"job-{job}.out").read_text()
    assert info["Restarts"] == "1" and f"job {job} (restart 1)" in log
    launcher = "torchrun" if script == "slurm/pretrain.sh" else "deepspeed"
    assert f"launcher={launcher} world_size=2" in log
    assert "USR1 received" in log and f"requeueing job {job}" in log
    stopped = int(log.split("stopping after step ")[1].split()[0])
    assert f"resumed from {run / 'checkpoints' / f'step{stopped:08d}'} at step {stopped}" in log
    steps = [r["step"] for r in read_metrics(run)[0]]
    assert steps[-1] == 60 and steps[steps.index(stopped) + 1] == stopped + 1
