"""Shared fixtures: the embedded corpus prepared once, DeepSpeed's CPU ops built once (in the
background), and a helper that runs the real entry point under a real launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_lm.runtime.distributed import free_port  # noqa: F401  (the tests' one, imported from here)

ROOT = Path(__file__).resolve().parent.parent

# Pin DeepSpeed's JIT-op cache where torch puts it by default, so that a test which moves HOME
# (to hide ~/.netrc) still finds the ops built once instead of compiling them again (~30 s).
if "TORCH_EXTENSIONS_DIR" not in os.environ:
    from torch.utils.cpp_extension import get_default_build_root

    os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(
        get_default_build_root(), f"py{sys.version_info.major}{sys.version_info.minor}_cpu"
    )
PRETRAIN = ROOT / "launchers" / "pretrain.py"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """The embedded corpus, prepared once for the whole session."""
    from dist_lm.data import corpus

    root = tmp_path_factory.mktemp("cache")
    corpus.prepare(str(root), 4096)
    return root


# DeepSpeed compiles its CPU ops on first use: about 30-45 s each on two cores, and CPU Adam took
# 2-3 minutes inside a rank bound to one core. Tests ask for the ops they need through these
# fixtures. Once the session's tests are collected, one background process builds the ops they
# need, in the order they are first needed, while tests that need none run (a test process keeps about
# one of two cores busy), and the tests that need the Adam ops run last. A fixture then loads its
# op as a run does, waiting for that build through torch's lock file in the extensions directory,
# or past one that a process killed by a test left there (dist_lm.runtime.op_builds).
OP_FIXTURES = {"ds_ops": "ShareMemCommBuilder", "fused_adam_op": "FusedAdamBuilder", "cpu_adam_op": "CPUAdamBuilder"}
BUILD_OPS = "import sys\nfrom dist_lm.runtime import engine\nfor name in sys.argv[1:]:\n    engine.load_op(name)\n"
_op_builds: subprocess.Popen | None = None


def _ops_needed(item) -> list[str]:
    return [op for fixture, op in OP_FIXTURES.items() if fixture in getattr(item, "fixturenames", ())]


def _needs_adam(item) -> bool:
    return any("Adam" in op for op in _ops_needed(item))


# The order files go to the two workers (pytest-xdist's --dist loadfile --no-loadscope-reorder,
# the Makefile, hands out whole files in collection order). First the files that launch nothing,
# while DeepSpeed's shared-memory op builds (~30 s alone, longer beside the tests: every CPU
# launch needs it); then the launching files, longest first on CI's two cores (docs/benchmarks.md,
# "The test suite on CI's machine"), so that the short ones even out the end, but the two that
# need DeepSpeed's Adam ops after the first ~300 s, which their background build takes. In each
# file, the tests that need an Adam op run last.
SLOW_FILES = (
    "test_planner.py",  # the longest of those that launch nothing
    "test_parallel_layouts.py",
    "test_checkpoints.py",
    "test_lifecycle.py",
    "test_parallel_layouts_bf16.py",
    "test_engine_launchers.py",  # CPU Adam
    "test_prepare.py",
    "test_breadth.py",  # fused Adam
    "test_monitoring.py",
    "test_hf_import.py",
    "test_chaos.py",
    "test_stopping.py",
    "test_slurm.py",
    "test_export.py",
    "test_launch_templates.py",
    "test_async_checkpoint.py",
    "test_cli.py",
)


def pytest_collection_modifyitems(session, config, items) -> None:
    launching = {item.path for item in items if _ops_needed(item)}

    def order(item) -> tuple:
        name = item.path.name
        rank = SLOW_FILES.index(name) if name in SLOW_FILES else len(SLOW_FILES)
        return (item.path in launching, rank, _needs_adam(item))  # stable: otherwise in file order

    items.sort(key=order)


def pytest_collection_finish(session) -> None:
    global _op_builds
    if os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0":
        return  # under pytest-xdist every worker collects every test: one of them builds for all
    needed = []
    for item in session.items:
        needed += [op for op in _ops_needed(item) if op not in needed]
    if needed:  # its failures show up where a fixture loads the op, with the compiler's message
        _op_builds = subprocess.Popen(
            [sys.executable, "-c", BUILD_OPS, *needed],
            env={**os.environ, "DS_ACCELERATOR": "cpu"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def pytest_sessionfinish(session) -> None:
    if _op_builds is not None and _op_builds.poll() is None:
        _op_builds.send_signal(signal.SIGINT)  # torch's build releases its lock on KeyboardInterrupt
        _op_builds.wait()


def load_op(builder: str) -> None:
    """As a run loads it: past a lock that a process killed by a test left (dist_lm.runtime.op_builds)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from dist_lm.runtime import engine

    engine.load_op(builder)


@pytest.fixture(scope="session")
def ds_ops() -> None:
    """DeepSpeed's shared-memory comm op, which every CPU launch uses."""
    load_op(OP_FIXTURES["ds_ops"])


@pytest.fixture(scope="session")
def fused_adam_op() -> None:
    """DeepSpeed's fused Adam for the CPU: the AdamW half of its Muon."""
    load_op(OP_FIXTURES["fused_adam_op"])


@pytest.fixture(scope="session")
def cpu_adam_op() -> None:
    """DeepSpeed's CPU Adam, for optimizer offload."""
    load_op(OP_FIXTURES["cpu_adam_op"])


# torch's own FileBaton, loaded from its file (it imports only os, time and warnings): importing
# the torch package for it would cost the test 1.5-2 s of start-up.
HOLD_BUILD_LOCK = """import importlib.util, os, sys, time
torch_dir = importlib.util.find_spec("torch").submodule_search_locations[0]
spec = importlib.util.spec_from_file_location("file_baton", os.path.join(torch_dir, "utils", "file_baton.py"))
file_baton = importlib.util.module_from_spec(spec)
spec.loader.exec_module(file_baton)
assert file_baton.FileBaton(sys.argv[1]).try_acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold_build_lock(lock: Path) -> subprocess.Popen:
    """A process that takes ``lock`` as torch does before it builds or loads an op (its FileBaton),
    and keeps it until killed."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_BUILD_LOCK, str(lock)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def age_file(path: Path, seconds: float) -> None:
    """Make ``path`` look last written ``seconds`` ago (a build lock: created then)."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def child_env(cache_dir: Path) -> dict:
    """Environment for child processes: quiet, one thread per rank, the prepared corpus."""
    e = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    e.update(DIST_LM_CACHE=str(cache_dir), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    # logging.wandb=auto then means disabled: starting and stopping wandb's service costs about 3 s
    # a launch. The tests of wandb itself (test_monitoring) take this out again.
    e["WANDB_MODE"] = "disabled"
    return e


@pytest.fixture
def env(cache_dir) -> dict:
    return child_env(cache_dir)


def launch(
    launcher: str, args: list[str], env: dict, nproc: int = 2, timeout: int = 300, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    """Run the training entry point under ``launcher``: python (launchers/pretrain.py, the path
    form), torchrun (-m dist_lm train) or deepspeed (--module dist_lm train), so that both forms
    are what the suite runs."""
    if launcher == "python":
        cmd = [sys.executable, str(PRETRAIN)]
    elif launcher == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "dist_lm",
            "train",
        ]
    elif launcher == "deepspeed":
        # --num_gpus is needed on CPU: without it the launcher counts NUMA nodes and starts one rank.
        cmd = [
            str(BIN / "deepspeed"),
            f"--num_gpus={nproc}",
            f"--master_port={free_port()}",
            "--module",
            "dist_lm",
            "train",
        ]
    else:
        raise ValueError(launcher)
    return subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def start_training(args: list[str], env: dict) -> subprocess.Popen:
    """launchers/pretrain.py started in the background, its output piped as text."""
    return subprocess.Popen(
        [sys.executable, str(PRETRAIN), *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_two_ranks(args: list[str], env: dict) -> list[subprocess.Popen]:
    """Two ranks started by hand: RANK, WORLD_SIZE, ... in each one's environment, no launcher
    that would end the other when one ends."""
    port = str(free_port())
    ranks = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    return [start_training(args, {**env, **ranks, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]


def stop_one_of_two_ranks(args: list[str], env: dict, run_dir: Path) -> tuple[subprocess.CompletedProcess, int, float]:
    """Two ranks started by hand (RANK, WORLD_SIZE, ... in the environment: no launcher to end the
    others); once three steps are logged rank 1 is stopped with SIGSTOP (its process lives on, its
    collectives never come). Returns rank 0 as it ended, rank 1's pid, and the seconds rank 0 took
    to end after the signal."""
    import time

    procs = start_two_ranks(args, env)
    try:
        metrics, deadline = run_dir / "metrics.jsonl", time.time() + 300
        while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGSTOP)
        signalled_at = time.time()
        out, err = procs[0].communicate(timeout=300)
        waited = time.time() - signalled_at
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return subprocess.CompletedProcess(procs[0].args, procs[0].returncode, out, err), procs[1].pid, waited


def assert_one_hang_line(stderr: str, stopped_pid: int, timeout_minutes: float) -> None:
    """The survivor's stderr holds one error line, naming the stopped rank and the timeout."""
    errors = [line for line in stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert (
        len(errors) == 1
        and errors[0].startswith("error: rank 0: ")
        and f"rank 1 (pid {stopped_pid} on " in errors[0]
        and "stopped answering" in errors[0]
    ), stderr[-3000:]
    assert f"no progress for {timeout_minutes:g} minutes (parallel.timeout_minutes)" in errors[0]
    assert errors[0].endswith("The last complete checkpoint is intact: run the same command again to continue from it.")


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def reference(cache_dir, monkeypatch_module) -> list[float]:
    """The plain-PyTorch reference's losses of the engine tests' run (tests/engine_runs.py)."""
    from engine_runs import COMMON, STEPS

    from reference import reference_losses

    monkeypatch_module.setenv("DIST_LM_CACHE", str(cache_dir))
    return reference_losses("debug", COMMON, STEPS)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of its own (CI runs as root), unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M,nr_inodes=1000", "tmpfs", str(disk)], check=True)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte with one file; that file."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for block in (1 << 16, 1):
            try:
                while f.write(b"\0" * block):
                    pass
            except OSError:
                pass
    return filler


def hooked(env: dict, hold_saves: str | None = None, host_available: int | None = None) -> dict:
    """``env`` for a run under tests/hooks/sitecustomize.py: its asynchronous saves wait as
    ``hold_saves`` says; psutil reports ``host_available`` bytes of host memory available."""
    path = os.pathsep.join(p for p in (str(ROOT / "tests" / "hooks"), env.get("PYTHONPATH", "")) if p)
    settings = {"DIST_LM_TEST_HOLD_SAVE": hold_saves, "DIST_LM_TEST_HOST_AVAILABLE": host_available}
    return {**env, "PYTHONPATH": path, **{k: str(v) for k, v in settings.items() if v is not None}}


def log_order(run_dir: Path, *texts: str) -> list[int]:
    """Where each of ``texts`` first appears in rank 0's train.log."""
    log = (run_dir / "train.log").read_text()
    return [log.index(text) for text in texts]


def assert_one_save_as_the_scaling_model_counts(ckpt: Path) -> None:
    """A checkpoint of ranks of one node holds, in DeepSpeed's files and ours, the bytes the
    scaling model charges its node for a save (dist_lm.plan.scaling.node_checkpoint_bytes, which
    dist-lm plan also prints for checkpoint.async_save's host memory), within pickle's overhead."""
    from dist_lm.config.io import from_dict
    from dist_lm.config.layout import parallel_layout
    from dist_lm.plan.scaling import node_checkpoint_bytes
    from dist_lm.runtime.precision import Precision
    from dist_lm.store.state import RunState

    state = RunState.read(ckpt)
    cfg = from_dict(state.config, str(ckpt))
    layout = parallel_layout(cfg.parallel, cfg.model, state.world_size)
    counted = node_checkpoint_bytes(cfg, layout, Precision(state.precision), state.world_size)
    written = sum(f.stat().st_size for pattern in ("*.pt", "*.safetensors") for f in ckpt.glob(pattern))
    assert written == pytest.approx(counted, rel=0.01), (written, counted)
