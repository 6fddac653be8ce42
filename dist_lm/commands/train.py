"""Pretrain a model: the same command under deepspeed, torchrun, mpirun, srun, or alone.

    dist-lm train [--config auto] [section.key=value ...]   # the plan for this machine
    dist-lm train --plan                                     # show that plan, don't train
    dist-lm train --config my.yaml [section.key=value ...]   # a YAML file, or a preset's name
    torchrun --nproc_per_node 2 -m dist_lm train --config debug train.max_steps=50
    deepspeed --num_gpus 2 --module dist_lm train --config debug
    dist-lm train --debug

--preset is another name for --config. In a checkout, launchers/pretrain.py is the same command
(and the templates in launchers/ and slurm/ run it).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from dist_lm.commands.arguments import Parser, add_trust_option
from dist_lm.config.batch import batch_sizes
from dist_lm.config.io import load_config, to_yaml
from dist_lm.config.layout import parallel_layout
from dist_lm.config.schema import UserError
from dist_lm.data.checks import resolve_data
from dist_lm.runtime.launch import detect
from dist_lm.train import watchdog
from dist_lm.train.exits import Exit

# --debug: the debug preset in one process, fp32, every step logged, non-finite values named.
# Given before the user's overrides, so any of them can still be overridden.
DEBUG_OVERRIDES = [
    "parallel.precision=fp32",
    "train.check_finite=true",
    "train.max_steps=10",
    "train.log_interval=1",
    "train.eval_interval=5",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(__doc__)
    p.add_argument(
        "--config",
        "--preset",
        dest="config",
        default="auto",
        help="a preset name (configs/NAME.yaml), a YAML file, or auto (the default): the preset "
        "and parallel settings that fit this machine, around any overrides given",
    )
    p.add_argument("--plan", action="store_true", help="print the auto plan and the launch commands, and exit")
    p.add_argument("--debug", action="store_true", help="single-process debug mode (default preset: debug)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--resume",
        metavar="auto|none|PATH",
        help="checkpoint.resume: auto (default) the newest complete "
        "checkpoint of the run, none, or a checkpoint or run directory",
    )
    p.add_argument(
        "--allow-data-change",
        action="store_true",
        help="checkpoint.allow_data_change=true: resume even though the data differs",
    )
    p.add_argument("--verbose", action="store_true", help="show DeepSpeed's start-up output (run.verbose=true)")
    add_trust_option(p)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")
    return p.parse_intermixed_args(argv)  # overrides may come before or after the flags


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.debug and args.config == "auto":
        args.config = "debug"
    try:
        overrides = (
            (DEBUG_OVERRIDES if args.debug else [])
            + args.overrides
            + (["run.verbose=true"] if args.verbose else [])
            + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
            + (["checkpoint.allow_data_change=true"] if args.allow_data_change else [])
        )
        auto = args.config == "auto"
        cfg = None if auto else load_config(args.config, overrides)
        if args.plan and not auto:
            raise UserError("--plan shows the auto plan: drop --config, or use dist-lm plan")
        if args.print_config and cfg is not None:
            print(to_yaml(cfg), end="")
            return 0
        dist_env = detect(os.environ)
        if cfg is not None:  # a layout or batch this many ranks cannot make, before seconds of importing torch
            batch_sizes(cfg.train, parallel_layout(cfg.parallel, cfg.model, dist_env.world_size).dp_size)
        data = resolve_data(cfg) if cfg is not None else None  # the auto plan's config is checked below
        if args.debug:
            os.environ.setdefault("CUDA_LAUNCH_BLOCKING", "1")  # CUDA errors at the line that caused them
        # These import torch and deepspeed (seconds): only after the cheap checks above.
        from dist_lm.plan.launch import format_plan
        from dist_lm.plan.planner import plan_for_this_machine
        from dist_lm.runtime.distributed import is_rank0, teardown
        from dist_lm.train import restore
        from dist_lm.train.faults import ExitOnOutOfMemory, TrainingDiverged
        from dist_lm.train.loop import Trainer
        from dist_lm.train.preemption import status_for_the_launcher
        from dist_lm.train.session import start
        from dist_lm.use.generate import sample

        restore.trust_checkpoints(args.trust_checkpoint)
        if args.debug and dist_env.world_size > 1:
            raise UserError("--debug runs one process: start it with plain python, not a launcher")
        plan = (
            plan_for_this_machine(
                overrides, dist_env.num_nodes, dist_env.world_size, restore.resumed_settings(overrides)
            )
            if auto
            else None
        )
        if args.plan or (args.print_config and plan is not None):
            print(format_plan(plan) if args.plan else to_yaml(plan.config), end="\n" if args.plan else "")
            return 0
        summary = ()
        if plan is not None:
            cfg, summary, data = plan.config, plan.summary(), resolve_data(plan.config)
        out_of_memory = ExitOnOutOfMemory(dist_env.rank, cfg.train.micro_batch_size, cfg.model.seq_len)
        with out_of_memory:  # placing the model and the optimizer state
            trainer = Trainer(start(cfg, summary, data), sample)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        _leave_after_bad_input()
        return Exit.BAD_INPUT
    except Exception as e:  # a rank lost during the set-up (a dead peer fails a collective at once)
        _exit_for_a_lost_rank(e)
    status, lost = Exit.OK, None
    try:
        with out_of_memory:
            trainer.fit()
        if trainer.stop.signal_name == "SIGINT":  # Ctrl-C, after a checkpoint
            status = Exit.INTERRUPTED
        elif trainer.stop.signal_name:  # stopped by SIGTERM/SIGUSR1 after a checkpoint: ask to be run again
            status = Exit.REQUEUE
    except TrainingDiverged as e:  # every rank raises it together, so the teardown below is safe
        print(f"error: training diverged: {e}", file=sys.stderr)
        status = Exit.DIVERGED
    except UserError as e:  # e.g. a checkpoint that cannot be written: agreed on by every rank
        print(f"error: {e}", file=sys.stderr)
        status = Exit.BAD_INPUT
    except Exception as e:
        lost = e
    finally:
        trainer.close()
    if lost is not None:
        _exit_for_a_lost_rank(lost)
    # Not reached after a crash: a barrier there would wait for ranks that may never come.
    trainer.watchdog.progress(f"finishing the run after step {trainer.step}")
    status = status_for_the_launcher(status, is_rank0())
    teardown()
    trainer.watchdog.stop()
    return status


def _leave_after_bad_input() -> None:
    """Bad input found once the process group was up (a run directory in use, a checkpoint of
    another model): stop the watchdog and close the group when alone, as a crash would not. Left
    open, its threads can outlive the interpreter and abort the exit ("terminate called without
    an active exception", status -6 instead of 2). Before the group started, there is nothing to
    close and torch is not imported."""
    watchdog.stop()
    if "dist_lm.runtime.distributed" in sys.modules:
        sys.modules["dist_lm.runtime.distributed"].leave_alone()


def _exit_for_a_lost_rank(error: Exception) -> NoReturn:
    """A collective that failed because another rank is gone: one line naming it, and exit
    status Exit.HANG at once. The process group cannot be closed (its barrier would wait for
    that rank), and left open for the interpreter's shutdown its gloo threads can abort the exit
    ("terminate called without an active exception": status -6 instead of 3, seen once in the
    chaos test), so the process leaves without that shutdown, its output flushed first. Any
    other error is a bug: its traceback."""
    line = watchdog.explain(error)
    if line is None:
        raise error
    print(line, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(Exit.HANG)
