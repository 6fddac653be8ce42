"""Plots and rankings of a run or a sweep.

dist-lm analyze RUN_DIR --out DIR     # loss, lr, tokens/s and MFU plots of one run
dist-lm analyze SWEEP_DIR --out DIR   # heatmap, top-5 learning curves, ranking, recommended config
dist-lm analyze RUN_A RUN_B ... --out DIR  # the runs' training losses on one plot, and their gaps
"""

from __future__ import annotations

import sys
from pathlib import Path

from dist_lm.commands.arguments import Parser
from dist_lm.observe import analysis


def main(argv: list[str] | None = None) -> int:
    p = Parser(__doc__)
    p.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="path",
        help="a run directory (metrics.jsonl) or a sweep directory (results.csv); several run directories are compared",
    )
    p.add_argument("--out", type=Path, required=True, help="where the PNGs go")
    args = p.parse_args(argv)
    if len(args.paths) > 1:
        return compare(args.paths, args.out)
    path = args.paths[0]
    if (path / "results.csv").is_file() and (path / "sweep.json").is_file():
        result = analysis.analyze_sweep(path, args.out)
        print(analysis.ranking_table(result["ranking"], result["keys"]) if result["ranking"] else "no trial finished")
        for r in result["failed"]:
            print(f"{r['trial']}: {r['status']}")
        if result["best"]:
            print(f"best: {result['best']['trial']} (best val loss {float(result['best']['best_val_loss']):.4f})")
            print(f"recommended overrides: {result['recommended']}")
        files = result["files"]
    elif (path / "metrics.jsonl").is_file():
        files = analysis.plot_run(path, args.out)
        if saves := analysis.checkpoint_summary(analysis.read_rows(path)):
            print(saves)
    else:
        print(
            f"error: {path} has neither metrics.jsonl (a run) nor results.csv and sweep.json (a sweep)", file=sys.stderr
        )
        return 2
    for f in files:
        print(f"wrote {f}")
    return 0


def compare(run_dirs: list[Path], out: Path) -> int:
    for run_dir in run_dirs:
        if not (run_dir / "metrics.jsonl").is_file():
            print(f"error: {run_dir} has no metrics.jsonl: only run directories are compared", file=sys.stderr)
            return 2
    table, plot = analysis.compare_runs(run_dirs, out)
    print(analysis.comparison_table(table))
    print(f"wrote {plot}")
    return 0
