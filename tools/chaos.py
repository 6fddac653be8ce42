"""Interrupt a two-rank CPU run many times and check that nothing was lost.

    python tools/chaos.py                       # 50 interruptions (a few minutes per ten on 2 cores)
    python tools/chaos.py --interruptions 8 --steps 24 --seed 1 --work /tmp/chaos

First an uninterrupted run of the same config. Then the same run again, interrupted at random
steps and phases (in a step, in a checkpoint save, in an evaluation) by one of: SIGKILL of one
rank (the other must end by itself: dist_lm.train.watchdog), SIGKILL of every rank, SIGUSR1 or SIGTERM
to one rank (every rank saves and exits 75). It is started again after each interruption, as a
job script would, until it finishes. Then it checks, and exits 1 if any check fails:

- the loss of every step and the final weights are bitwise those of the uninterrupted run;
- every checkpoint directory left is complete;
- metrics.jsonl holds each step exactly once;
- no process outlived its interruption by more than --bound seconds.

--async-save: every other start saves with checkpoint.async_save=true (the files written by a
thread while training goes on), and the interruptions in a save alternate between the two ways,
the first during such a write; a run saved one way resumes the other.

It prints the counts (interruptions of each kind and phase, starts, seconds lost) as one JSON
line. The ranks are started by hand (RANK, WORLD_SIZE, ... in the environment), with no launcher
to end the others: what ends them is the run's own fault handling.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from dist_lm.runtime.distributed import free_port
from dist_lm.store import checkpoints
from dist_lm.train import restore

ROOT = Path(__file__).resolve().parent.parent

PRETRAIN = ROOT / "launchers" / "pretrain.py"
KINDS = ("kill-one", "kill-all", "usr1", "term")
PHASES = ("step", "save", "evaluation")
RANKS = 2


def config(steps: int) -> list[str]:
    # A checkpoint every 3 steps and an evaluation every 5, so every phase comes up often.
    return [
        "--config",
        "debug",
        f"train.max_steps={steps}",
        "train.log_interval=1",
        "train.eval_interval=5",
        "train.eval_samples=64",
        "checkpoint.interval=3",
        "checkpoint.keep_last=2",
        "parallel.zero_stage=2",
        "parallel.timeout_minutes=0.5",
        "logging.wandb=disabled",
        "logging.progress=false",
        "train.sample_tokens=0",
    ]


def start(args: list[str], run_dir: Path, attempt: int) -> list[subprocess.Popen]:
    port = str(free_port())
    procs = []
    for rank in range(RANKS):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(RANKS),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(RANKS),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        log = open(run_dir.parent / f"{run_dir.name}-start{attempt:03d}-rank{rank}.log", "w")
        procs.append(
            subprocess.Popen(
                [sys.executable, str(PRETRAIN), *args, f"run.dir={run_dir}"],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    return procs


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return out


def last_step(run_dir: Path) -> int:
    return max((r["step"] for r in rows(run_dir) if "loss" in r), default=0)


def saving(run_dir: Path) -> bool:
    """Is there a step directory without state.json (a save in progress)?"""
    root = run_dir / "checkpoints"
    return root.is_dir() and any(
        p.is_dir() and checkpoints.step_of(p) is not None and not (p / checkpoints.STATE).exists()
        for p in root.iterdir()
    )


def wait_for_phase(
    procs, log: Path, run_dir: Path, phase: str, at_step: int, rng: random.Random, step_s: float
) -> bool:
    """Wait until the run is in ``phase`` at (or after) ``at_step``; False if it ended first. Its
    training must have begun (``log``, rank 0's output, says so): by then the rows of earlier
    starts past its checkpoint are gone from metrics.jsonl."""
    while "training from step" not in (log.read_text() if log.is_file() else ""):
        if all(p.poll() is not None for p in procs):
            return False
        time.sleep(0.05)
    while last_step(run_dir) < at_step:
        if all(p.poll() is not None for p in procs):
            return False
        time.sleep(0.01)
    if phase == "step":
        time.sleep(rng.uniform(0, step_s))
    elif phase == "save":  # the save of a multiple of 3 starts once its step's row is written
        target = (last_step(run_dir) // 3 + 1) * 3
        # until its directory appears (an asynchronous save's stays without state.json while its
        # thread writes); past the step after it, the save was too short to catch
        while not saving(run_dir) and last_step(run_dir) <= target:
            if all(p.poll() is not None for p in procs):
                return False
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.05))
    else:  # the evaluation of the next multiple of 5 comes after its step's training
        target = (last_step(run_dir) // 5 + 1) * 5
        while last_step(run_dir) < target - 1:
            if all(p.poll() is not None for p in procs):
                return False
            time.sleep(0.005)
        time.sleep(step_s * rng.uniform(1.0, 1.5))
    return any(p.poll() is None for p in procs)


def interrupt(procs, kind: str, rng: random.Random) -> None:
    one = rng.randrange(RANKS)
    for rank, p in enumerate(procs):
        if kind == "kill-all" or rank == one:
            try:
                os.kill(
                    p.pid,
                    {
                        "kill-one": signal.SIGKILL,
                        "kill-all": signal.SIGKILL,
                        "usr1": signal.SIGUSR1,
                        "term": signal.SIGTERM,
                    }[kind],
                )
            except ProcessLookupError:
                pass


def wait_all(procs, bound: float) -> tuple[list[int | None], float]:
    start = time.time()
    for p in procs:
        try:
            p.wait(timeout=max(0.1, bound - (time.time() - start)))
        except subprocess.TimeoutExpired:
            pass
    late = [p for p in procs if p.poll() is None]
    for p in late:
        p.kill()
        p.wait()
    return [None if p in late else p.returncode for p in procs], time.time() - start


def final_weights(run_dir: Path) -> dict:
    return restore.consolidated_weights(checkpoints.find_for_reading(run_dir).path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interruptions", type=int, default=50)
    p.add_argument("--steps", type=int, default=0, help="train.max_steps (default: 3 per interruption, at least 24)")
    p.add_argument("--keep", action="store_true", help="keep the work directory when every check passes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--bound",
        type=float,
        default=60.0,
        help="seconds a process may take to end after an interruption (the survivor of a dead rank "
        "included; parallel.timeout_minutes is 0.5 here)",
    )
    p.add_argument("--async-save", action="store_true", help="every other start with checkpoint.async_save=true")
    p.add_argument("--work", type=Path, help="a directory for the two runs and their logs (default: a temporary one)")
    a = p.parse_args()
    steps = a.steps or max(24, 3 * a.interruptions)
    work = a.work or Path(tempfile.mkdtemp(prefix="dist-lm-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    args = config(steps)

    def args_for(attempt: int, async_save: bool | None = None) -> list[str]:
        async_save = attempt % 2 == 1 if async_save is None else async_save
        return [*args, "checkpoint.async_save=true"] if a.async_save and async_save else args

    saves_interrupted = async_saves_interrupted = 0

    os.environ.setdefault("OMP_NUM_THREADS", "1")

    whole, chaos = work / "whole", work / "chaos"
    t0 = time.time()
    codes, _ = wait_all(start(args, whole, 0), 3600)
    whole_s = time.time() - t0
    if codes != [0] * RANKS:
        print(f"error: the uninterrupted run failed ({codes}); see {work}/whole-start000-rank*.log", file=sys.stderr)
        return 1
    step_s = statistics.median(r["step_time"] for r in rows(whole) if "step_time" in r)

    counts: Counter = Counter()
    problems: list[str] = []
    t0 = time.time()
    attempt = 0
    # Random steps, in order, short of the last save and evaluation (each phase must still come);
    # every kind and phase in turn, shuffled, so that a short chaos run has each of them.
    plan = sorted(rng.randrange(1, steps - 5) for _ in range(a.interruptions))
    kinds = [KINDS[i % len(KINDS)] for i in range(a.interruptions)]
    phases = [PHASES[i % len(PHASES)] for i in range(a.interruptions)]
    rng.shuffle(kinds)
    rng.shuffle(phases)
    for i, (at_step, kind, phase) in enumerate(zip(plan, kinds, phases)):
        attempt += 1
        # --async-save: interruptions in a save alternate between the two ways, the first asynchronous
        by_save = None
        if phase == "save":
            by_save, saves_interrupted = saves_interrupted % 2 == 0, saves_interrupted + 1
        procs = start(args_for(attempt, by_save), chaos, attempt)
        if not wait_for_phase(procs, work / f"chaos-start{attempt:03d}-rank0.log", chaos, phase, at_step, rng, step_s):
            codes, _ = wait_all(procs, a.bound)
            if codes == [0] * RANKS:
                break  # it finished before this interruption came
            problems.append(f"start {attempt} ended by itself with {codes} before interruption {i + 1}")
            continue
        if by_save and saving(chaos):  # a step directory without state.json: staged or being written
            async_saves_interrupted += 1
        interrupt(procs, kind, rng)
        counts[f"{kind} in a {phase}"] += 1
        codes, took = wait_all(procs, a.bound)
        if None in codes:
            problems.append(f"start {attempt}: {kind} in a {phase}: a process still ran {a.bound:g} s later (killed)")
        # 0: the run had just finished (an interruption in its last moments)
        if kind == "kill-one" and 3 in codes:  # the survivor: one line naming the rank, no traceback
            survivor = work / f"chaos-start{attempt:03d}-rank{codes.index(3)}.log"
            errors = [
                line for line in survivor.read_text().splitlines() if line.startswith("error:") or "Traceback" in line
            ]
            if len(errors) != 1 or "stopped answering" not in errors[0]:
                problems.append(
                    f"start {attempt}: the survivor of kill-one did not end with one line naming the "
                    f"rank ({survivor}): {errors[:3]}"
                )
        expected = {"kill-one": {-9, 3, 0}, "kill-all": {-9}, "usr1": {75, 0}, "term": {75, 0}}[kind]
        if not set(c for c in codes if c is not None) <= expected:
            problems.append(f"start {attempt}: {kind} in a {phase}: exit statuses {codes}, expected {sorted(expected)}")
    while True:  # to the end
        attempt += 1
        codes, _ = wait_all(start(args_for(attempt), chaos, attempt), 3600)
        if codes == [0] * RANKS:
            break
        problems.append(f"start {attempt} (after the interruptions) ended with {codes}")
        if attempt > a.interruptions + 5:
            break
    chaos_s = time.time() - t0

    ours, theirs = rows(chaos), rows(whole)
    train_steps = [r["step"] for r in ours if "loss" in r]
    if train_steps != list(range(1, steps + 1)):
        dup = [s for s, n in Counter(train_steps).items() if n > 1]
        problems.append(
            f"metrics.jsonl does not hold each step once: {len(train_steps)} rows, repeated {dup[:10]}, "
            f"missing {sorted(set(range(1, steps + 1)) - set(train_steps))[:10]}"
        )
    losses = {r["step"]: r["loss"] for r in ours if "loss" in r}
    differ = [r["step"] for r in theirs if "loss" in r and losses.get(r["step"]) != r["loss"]]
    if differ:
        problems.append(f"losses differ from the uninterrupted run's at steps {differ[:10]}")
    for d in sorted((chaos / "checkpoints").iterdir()):
        if d.is_dir() and checkpoints.step_of(d) is not None and checkpoints.problem_with(d):
            problems.append(f"{d} is half-written: {checkpoints.problem_with(d)}")
    mine, reference = final_weights(chaos), final_weights(whole)
    if mine.keys() != reference.keys() or any(not mine[k].equal(reference[k]) for k in reference):
        problems.append("the final weights differ from the uninterrupted run's")

    print(
        json.dumps(
            {
                "interruptions": sum(counts.values()),
                "by_kind_and_phase": dict(sorted(counts.items())),
                "async_saves_interrupted": async_saves_interrupted,
                "starts": attempt,
                "steps": steps,
                "uninterrupted_s": round(whole_s, 1),
                "interrupted_s": round(chaos_s, 1),
                "seconds_lost": round(chaos_s - whole_s, 1),
                "problems": problems,
                "work": str(work),
            }
        )
    )
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if not problems and not (a.keep or a.work):
        shutil.rmtree(work, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
