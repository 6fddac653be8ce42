"""Where the training step waits for the GPU: runs ``dist-lm train`` with torch's CUDA sync debug
mode on for a few steps after the first ones, and prints each distinct host-device sync with the
Python stack that made it.

    python tools/sync_audit.py --from-step 20 --steps 3 -- --config h100-80gb model.n_layers=12 ...
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
import warnings

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--from-step", type=int, default=20)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("train_args", nargs=argparse.REMAINDER)
    args = p.parse_args()
    train_args = [a for a in args.train_args if a != "--"]

    import dist_lm.train.loop as loop
    from dist_lm.cli import main as cli_main

    seen: collections.Counter[str] = collections.Counter()
    original_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return original_show(message, category, filename, lineno, file, line)
        stack = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        seen["".join(traceback.format_list(stack[-10:]))] += 1

    warnings.showwarning = show
    warnings.filterwarnings("always", message=".*synchronizing.*")
    step_once = loop.Trainer._train_step

    def audited(self):
        # on for the whole loop iteration (the step, and what the loop does after it)
        on = args.from_step <= self.step < args.from_step + args.steps
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn" if on else "default")
        return step_once(self)

    loop.Trainer._train_step = audited
    status = cli_main(["train", *train_args])
    print(f"== {sum(seen.values())} syncs in {args.steps} steps from step {args.from_step}, "
          f"{len(seen)} distinct stacks")
    for stack, count in seen.most_common():
        print(f"-- {count} times:\n{stack}")
    return status


if __name__ == "__main__":
    sys.exit(main())
