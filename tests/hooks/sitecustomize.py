"""Loaded by every Python process a test starts with this directory on PYTHONPATH
(tests/test_async_checkpoint.py): holds the thread that writes an asynchronous checkpoint
(dist_lm.train.async_checkpoint, a thread named "save stepNNNNNNNN") before it writes anything,
so that a test can see training go on, kill the run or fill the disk while the write is pending.

DIST_LM_TEST_HOLD_SAVE="STEP=CONDITION[,STEP=CONDITION...]", CONDITION one of:
  rows:N     until the run's metrics.jsonl holds the training row of step N
  file:PATH  until PATH exists
  forever

DIST_LM_TEST_HOST_AVAILABLE=BYTES: psutil reports that much host memory available (the staging
of an asynchronous save then finds the node short of memory, dist_lm.runtime.hardware.host_memory_for).
"""

import json
import os
import threading
import time
from pathlib import Path

_holds = dict(item.split("=", 1) for item in os.environ.get("DIST_LM_TEST_HOLD_SAVE", "").split(",") if "=" in item)


def _held(condition: str, checkpoint_dir: Path) -> bool:
    kind, _, value = condition.partition(":")
    if kind == "rows":
        metrics = checkpoint_dir.parent.parent / "metrics.jsonl"  # RUN/checkpoints/stepN
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        rows = [json.loads(line) for line in lines if line.endswith("}")]
        steps = {row["step"] for row in rows if "loss" in row}
        return int(value) not in steps
    if kind == "file":
        return not Path(value).exists()
    return True  # forever


if _holds:
    _start = threading.Thread.start

    def start(self):
        if self.name.startswith("save step") and str(int(self.name[len("save step") :])) in _holds:
            condition, target, pending = _holds[str(int(self.name[len("save step") :]))], self._target, self._args[0]

            def held(*args, **kwargs):
                while _held(condition, pending.path):
                    time.sleep(0.02)
                return target(*args, **kwargs)

            self._target = held
        return _start(self)

    threading.Thread.start = start

if os.environ.get("DIST_LM_TEST_HOST_AVAILABLE"):
    import psutil

    _virtual_memory, _available = psutil.virtual_memory, int(os.environ["DIST_LM_TEST_HOST_AVAILABLE"])
    psutil.virtual_memory = lambda: _virtual_memory()._replace(available=_available)
