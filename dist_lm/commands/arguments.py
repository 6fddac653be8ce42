"""Command-line arguments that several subcommands share, defined once."""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPES = ["trained", "fp32", "bf16", "fp16"]


def add_checkpoint_choice(p: argparse.ArgumentParser, name: str = "checkpoint",
                          help: str = "a checkpoint directory, or a run directory (its newest)") -> None:
    """Which checkpoint a tool reads (a checkpoint or run directory, or the run's best) and in
    which precision it runs the model (default: the run's own)."""
    p.add_argument(name, type=Path, help=help)
    p.add_argument("--best", action="store_true", help="the run's checkpoint with the lowest validation loss")
    p.add_argument("--dtype", choices=DTYPES, default="trained",
                   help="precision to run the model in (default: the run's, as the training loop evaluates)")
