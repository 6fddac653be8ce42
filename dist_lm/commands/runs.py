"""List runs and their checkpoints: step, tokens, validation loss, parameters, size on disk.

    dist-lm runs [RUNS_DIR_OR_RUN_DIR]   # default: runs
    dist-lm runs runs --json

Read from metadata only (config.yaml, state.json, file sizes). A checkpoint whose save did not
finish, or whose files do not match what was written, is marked INCOMPLETE.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dist_lm.commands.arguments import Parser
from dist_lm.observe.runs import format_table, list_runs


def main(argv: list[str] | None = None) -> int:
    p = Parser(__doc__)
    p.add_argument("root", nargs="?", type=Path, default=Path("runs"))
    p.add_argument("--json", action="store_true", help="one JSON object per checkpoint instead of a table")
    args = p.parse_args(argv)
    rows = list_runs(args.root)
    if not rows:
        print(f"no runs under {args.root}", file=sys.stderr)
        return 1
    print("\n".join(json.dumps(r) for r in rows) if args.json else format_table(rows))
    return 0
