"""Sweep hyperparameters: each trial is a normal run directory under OUT; results go to OUT/results.csv.

    dist-lm sweep --config debug --out sweeps/lr train.max_steps=200
        (default grid: optim.lr in {6e-4, 8e-4, 1e-3, 1.2e-3, 1.5e-3} x optim.min_lr_ratio in {0.1, 0.3, 0.5, 0.7})
    dist-lm sweep --config debug --out sweeps/x --param optim.lr=1e-3,2e-3 --param model.n_layers=2,4
    dist-lm sweep --config debug --out sweeps/r --random 8 --param optim.lr=loguniform:1e-4:3e-3
    dist-lm sweep ... --launcher "torchrun --standalone --nproc_per_node 2"

Positional section.key=value overrides apply to every trial (shorten the runs here). Running the
same command again resumes an interrupted sweep. Then: dist-lm analyze OUT --out OUT/analysis
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from dist_lm.commands.arguments import Parser, integer
from dist_lm.config.io import load_config
from dist_lm.config.schema import MAX_SEED, UserError
from dist_lm.train import sweep


def main(argv: list[str] | None = None) -> int:
    p = Parser(__doc__)
    p.add_argument("--config", required=True, help="preset or YAML file every trial starts from")
    p.add_argument("--out", required=True, type=Path, help="sweep directory")
    p.add_argument("--param", action="append", default=[], help="KEY=v1,v2 (grid) or KEY=DIST (--random); repeatable")
    p.add_argument("--random", type=integer(1), metavar="N", help="N random trials instead of the grid")
    p.add_argument("--seed", type=integer(0, MAX_SEED), default=0, help="seed of the random search")
    p.add_argument("--launcher", default=None, help='command that starts a trial, e.g. "torchrun --nproc_per_node 2"')
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_intermixed_args(argv)
    try:
        if args.random:
            axes = dict(sweep.parse_distribution(t) for t in args.param)
            if not axes:
                raise UserError("sweep: --random needs at least one --param KEY=DIST")
            trials = sweep.random_trials(axes, args.random, args.seed)
        else:
            axes = dict(sweep.parse_values(t) for t in args.param) if args.param else sweep.DEFAULT_GRID
            trials = sweep.grid_trials(axes)
        # Every trial's config must load: check them all now rather than fail one by one later.
        for t in trials:
            load_config(args.config, args.overrides + [f"{k}={v}" for k, v in t.params.items()])
        launcher = shlex.split(args.launcher) if args.launcher else sweep.default_launcher()
        spec = {
            "config": args.config,
            "overrides": args.overrides,
            "keys": list(axes),
            "trials": [t.params for t in trials],
            "launcher": launcher,
        }
        rows = sweep.run(args.out, args.config, args.overrides, trials, launcher, spec)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "diverged", "failed")}
    print(
        f"sweep: {len(rows)} trials ({counts['ok']} ok, {counts['diverged']} diverged, {counts['failed']} failed); "
        f"results in {args.out / 'results.csv'}"
    )
    return 0
