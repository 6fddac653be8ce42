"""Command-line arguments that several subcommands share, defined once: the parser every
subcommand uses (one line and exit status 2 for a bad argument), the range-checked argument
types, and the options several take."""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Callable, NoReturn

from dist_lm.config.errors import MAX_INT

DTYPES = ["trained", "fp32", "bf16", "fp16"]
# A run made only to measure something (find-batch's trial steps, the benches): nothing evaluated,
# sampled, checkpointed or sent to wandb, and no progress bar in its log.
MEASURING_RUN = (
    "train.eval_interval=0",
    "train.sample_tokens=0",
    "checkpoint.interval=0",
    "checkpoint.save_at_end=false",
    "logging.wandb=disabled",
    "logging.progress=false",
)


class Parser(argparse.ArgumentParser):
    """argparse, with a bad argument said in one line (not the usage block), and a config key
    written as a flag (--max_steps 20, a nanoGPT habit) pointed at the override syntax."""

    def __init__(self, doc: str | None):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message: str) -> NoReturn:
        flag = re.search(r"unrecognized arguments: --?([a-z_]+)", message)
        hint = (
            f"; config keys are set as section.key=value, e.g. train.{flag.group(1)}=..."
            if flag and "_" in flag.group(1)
            else ""
        )
        print(f"error: {self.prog}: {message}{hint} ({self.prog} --help lists the arguments)", file=sys.stderr)
        raise SystemExit(2)


def integer(low: int, high: int = MAX_INT) -> Callable[[str], int]:
    """An argument type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside [{low}, {high}]")
        return value

    return parse


def number(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argument type: a finite number in the interval from low to high (open at either end)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        inside = (
            math.isfinite(value)
            and (low < value if low_open else low <= value)
            and (value < high if high_open else value <= high)
        )
        if not inside:
            raise argparse.ArgumentTypeError(
                f"{text} is outside {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            )
        return value

    return parse


def add_checkpoint_choice(
    p: argparse.ArgumentParser,
    name: str = "checkpoint",
    help: str = "a checkpoint directory, or a run directory (its newest)",
) -> None:
    """Which checkpoint a tool reads (a checkpoint or run directory, or the run's best) and in
    which precision it runs the model (default: the run's own)."""
    p.add_argument(name, type=Path, help=help)
    p.add_argument("--best", action="store_true", help="the run's checkpoint with the lowest validation loss")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="trained",
        help="precision to run the model in (default: the run's, as the training loop evaluates)",
    )
    add_trust_option(p)


TRUST_HELP = (
    "unpickle whatever the checkpoint's DeepSpeed files hold (unpickling can run code: only for a "
    "checkpoint you made or whose maker you trust); without it they are read weights-only"
)


def add_trust_option(p: argparse.ArgumentParser) -> None:
    """--trust-checkpoint (dist_lm.train.restore.trust_checkpoints)."""
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
