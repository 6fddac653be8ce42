"""Where the training step waits for the GPU: runs ``dist-lm train`` with torch's CUDA sync debug
mode on for a few steps after the first ones, and prints each distinct host-device sync with the
Python stack that made it.

    python tools/sync_audit.py --from-step 20 --steps 3 [--max-per-step 1] [--json FILE] \
        -- --config h100-80gb model.n_layers=12 ...

A sync leaves the GPU idle while the host launches what follows it; at 12-124M parameters, where
a step is tens of milliseconds, that shows in tokens/s. With --max-per-step the exit status is 1
when the steps make more syncs than that on average (the training run's own status otherwise).
The sync mode is on for the whole loop iteration of each audited step: the step, and what the
loop does after it (give train.log_interval a value the audited steps miss: a metrics row reads
the loss, a sync on purpose).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import traceback
import warnings
from pathlib import Path

import torch

# Both audits of 2026-12-03 (torch 2.11, an H200) showed one sync reported at the call that turns
# the sync debug mode back off, once per audit where a sync of the step would recur every step:
# it is not counted.
SWITCH = "set_sync_debug_mode"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-step", type=int, default=20, help="the first audited step (after compilation)")
    p.add_argument("--steps", type=int, default=3, help="steps audited")
    p.add_argument("--max-per-step", type=float, help="exit 1 above this many syncs per audited step")
    p.add_argument("--json", type=Path, help="also write the counts and stacks to this file")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then dist-lm train's arguments")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("error: the sync audit needs a CUDA GPU", file=sys.stderr)
        return 2
    train_args = [a for a in args.train_args if a != "--"]

    import dist_lm.train.loop as loop
    from dist_lm.cli import main as cli_main

    stacks: collections.Counter[str] = collections.Counter()
    original_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return original_show(message, category, filename, lineno, file, line)
        stack = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        if stack[-1].name != SWITCH:
            stacks["".join(traceback.format_list(stack[-10:]))] += 1

    warnings.showwarning = show
    warnings.filterwarnings("always", message=".*synchronizing.*")
    step_once = loop.Trainer._train_step

    def audited(self):
        on = args.from_step <= self.step < args.from_step + args.steps
        torch.cuda.set_sync_debug_mode("warn" if on else "default")
        return step_once(self)

    loop.Trainer._train_step = audited
    status = cli_main(["train", *train_args])
    total = sum(stacks.values())
    print(f"== {total} syncs in {args.steps} steps from step {args.from_step}, {len(stacks)} distinct stacks")
    for stack, count in stacks.most_common():
        print(f"-- {count} times:\n{stack}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "steps": args.steps,
                    "syncs": total,
                    "stacks": [{"count": c, "stack": s} for s, c in stacks.most_common()],
                }
            )
        )
    if status == 0 and args.max_per_step is not None and total > args.max_per_step * args.steps:
        print(
            f"error: {total / args.steps:g} syncs per step, more than --max-per-step {args.max_per_step:g}",
            file=sys.stderr,
        )
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
