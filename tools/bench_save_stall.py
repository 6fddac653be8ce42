"""How long a checkpoint stops training: the same run saved once mid-way, synchronously and with
checkpoint.async_save, each a real `launchers/pretrain.py` run in a process of its own.

    python tools/bench_save_stall.py --config h100-80gb --steps 12 --dir /tmp/stall [section.key=value ...]

The stall of a save at step k is how much longer the interval from step k's row to step k+1's
took than the run's median step (metrics.jsonl's elapsed_s: the save runs between the two rows).
For the synchronous save that is the save's whole time; for the asynchronous one, the copy to
host memory and whatever the background write takes from the steps that follow (also shown: the
median step while the write was pending against the median before it). Beside it, the save's own
row of metrics.jsonl: how long the trainer stood still for it (``held_s``) and how long until it
was complete (``save_s``; for the asynchronous save, to the first step that found every rank's
files written). The asynchronous run saves once more at its last step, into the host buffers of
its first save (dist_lm.runtime.host_buffers): ``later_held_s`` is what that save held training
for, without the wait for the first save's write to finish. Each run's checkpoints are removed
once measured (``checkpoint_bytes``: the first save's files), unless --keep-checkpoints: at 1.1B
they are 20 GB each. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dist_lm.commands.arguments import MEASURING_RUN  # noqa: E402
from dist_lm.store import checkpoints  # noqa: E402


def run(config: str, overrides: list[str], steps: int, run_dir: Path, async_save: bool, keep: bool) -> dict:
    save_at = steps // 2
    args = [
        "--config",
        config,
        *MEASURING_RUN,
        *overrides,
        f"train.max_steps={steps}",
        "train.log_interval=1",
        f"checkpoint.interval={save_at}",
        f"checkpoint.async_save={str(async_save).lower()}",
        f"checkpoint.save_at_end={str(async_save).lower()}",
        f"run.dir={run_dir}",
    ]
    proc = subprocess.run([sys.executable, str(ROOT / "launchers" / "pretrain.py"), *args], cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"error: the run in {run_dir} ended with exit status {proc.returncode}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    elapsed = {r["step"]: r["elapsed_s"] for r in rows if "loss" in r}
    saved = {r["checkpoint_step"]: r for r in rows if "checkpoint_step" in r}
    intervals = {s: elapsed[s] - elapsed[s - 1] for s in elapsed if s - 1 in elapsed}
    typical = statistics.median(v for s, v in intervals.items() if s != save_at + 1)
    before = [v for s, v in intervals.items() if s <= save_at]
    after = [v for s, v in intervals.items() if s > save_at + 1]
    first = run_dir / "checkpoints" / checkpoints.tag_for(save_at)
    checkpoint_bytes = sum(checkpoints.RunState.read(first).manifest.values())
    if not keep:
        shutil.rmtree(run_dir / "checkpoints")
    return {
        "checkpoint_bytes": checkpoint_bytes,
        "stall_s": round(intervals[save_at + 1] - typical, 2),
        "held_s": round(saved[save_at]["checkpoint_stall_s"], 2),
        "save_s": round(saved[save_at]["checkpoint_s"], 2),
        "later_held_s": round(saved[steps]["checkpoint_stall_s"], 2) if steps in saved else None,
        "median_step_s": round(typical, 3),
        "median_step_before_s": round(statistics.median(before), 3) if before else None,
        "median_step_after_s": round(statistics.median(after), 3) if after else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--dir", type=Path, required=True, help="where the two runs go")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    a = p.parse_args()
    for name in ("sync", "async"):  # a run directory that exists would be resumed, and its checkpoints removed
        if (a.dir / name).exists():
            print(f"error: {a.dir / name} exists: give --dir a new or empty directory", file=sys.stderr)
            raise SystemExit(2)
    result = {"config": a.config, "overrides": a.overrides, "steps": a.steps, "saved_at": a.steps // 2}
    for name, async_save in (("sync", False), ("async", True)):
        result[name] = run(a.config, a.overrides, a.steps, a.dir / name, async_save, a.keep_checkpoints)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
