"""The short chaos run (tools/chaos.py): a two-rank CPU run interrupted 5 times (SIGKILL of one
rank and of both, SIGUSR1, SIGTERM; in a step, a save, an evaluation), resumed each time, ends
with the uninterrupted run's losses and weights, bit for bit, and nothing half-written. Every
other start saves with checkpoint.async_save, so that some interruptions come during a write
made while training goes on, and runs saved one way resume the other."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_five_interruptions_lose_nothing(env, ds_ops, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "chaos.py"),
            "--interruptions",
            "5",
            "--steps",
            "24",
            "--seed",
            "3",
            "--async-save",  # every other start writes its checkpoints while training goes on
            "--work",
            str(tmp_path),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, f"exit {proc.returncode} without a summary\n{proc.stderr[-3000:]}"
    summary = json.loads(lines[-1])
    assert proc.returncode == 0 and summary["problems"] == [], proc.stderr[-3000:]
    assert summary["interruptions"] == 5 and summary["starts"] >= 6
    assert summary["async_saves_interrupted"] >= 1  # an interruption while a thread wrote a checkpoint
    kinds = {key.split(" in a ")[0] for key in summary["by_kind_and_phase"]}
    phases = {key.split(" in a ")[1] for key in summary["by_kind_and_phase"]}
    assert kinds == {"kill-one", "kill-all", "usr1", "term"} and phases == {"step", "save", "evaluation"}
