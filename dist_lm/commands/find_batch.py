"""The largest micro-batch that fits this machine's GPU, measured: a short real run per size.

    dist-lm find-batch --config rtx-12gb [--limit 256] [section.key=value ...]

The plan (--config auto, dist-lm plan) sizes the micro-batch by dist_lm.plan.memory's prediction, a
model measured for our model family, eager and compiled, but not for everything a config can
say (compiled runs with activation checkpointing, mixture-of-experts layers, other GPUs'
kernels). Where the prediction is off, memory is left unused (a larger micro-batch is often
faster) or the run does not fit. This probe runs `dist-lm train` for two optimizer
steps of one micro-batch each (forward, backward, optimizer step, data from the sampler, compile
and everything else as configured) at a size, doubling from the configured micro-batch (halving
if that does not fit) and then bisecting, and keeps the largest size whose measured peak
(torch.cuda.max_memory_allocated) stays within the planner's budget for the GPU: 90% of its
memory less 1.5 GB, room for the CUDA context and the allocator. A run that runs out of memory
says so by its exit status (dist_lm.train.exits.Exit.OUT_OF_MEMORY). One process on one GPU: with
ZeRO-2/3 over more ranks, more fits. Each probe compiles afresh, so expect minutes.
Prints each probe, then the override to use.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from dist_lm.commands.arguments import MEASURING_RUN, Parser, integer
from dist_lm.config.io import load_config
from dist_lm.config.schema import UserError


def peak_gb(config: str, overrides: list[str], micro: int, work: Path) -> float | None:
    """Peak GPU memory of two one-micro-batch steps at this size; None if it ran out of memory."""
    from dist_lm.observe.analysis import read_rows
    from dist_lm.train.exits import Exit

    run_dir = work / f"micro{micro}"
    args = [
        *overrides,
        f"train.micro_batch_size={micro}",
        f"train.global_batch_size={micro}",
        "train.max_steps=2",
        "train.log_interval=1",
        *MEASURING_RUN,
        f"run.dir={run_dir}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "dist_lm", "train", "--config", config, *args], capture_output=True, text=True
    )
    if proc.returncode == Exit.OUT_OF_MEMORY:
        return None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise UserError(f"find-batch: the run at micro-batch {micro} failed for another reason than memory: {last}")
    peak = max(r["peak_mem_gb"] for r in read_rows(run_dir) if r.get("peak_mem_gb") is not None)
    shutil.rmtree(run_dir)  # a probe's run directory holds its log and metrics only
    return peak


def main(argv: list[str] | None = None) -> int:
    p = Parser(__doc__)
    p.add_argument("--config", required=True, help="a preset or YAML file")
    p.add_argument("--limit", type=integer(1), default=256, help="largest micro-batch to try (default 256)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)  # a bad config fails here, before any run
        import torch

        if not torch.cuda.is_available():
            raise UserError(
                "find-batch: measures a GPU's memory and this machine has none; "
                "dist-lm plan predicts the micro-batch instead"
            )
        from dist_lm.plan.sizing import largest_fitting, usable_gb
        from dist_lm.runtime.hardware import detect_machine

        machine = detect_machine()
        budget = usable_gb(machine)
        print(
            f"find-batch: {machine.gpu_name}, budget {budget:.1f} GB of {machine.gpu_mem_gb:.0f} GB; "
            f"starting at micro-batch {cfg.train.micro_batch_size}",
            flush=True,
        )
        with tempfile.TemporaryDirectory() as work:

            def fits(micro: int) -> bool:
                peak = peak_gb(args.config, args.overrides, micro, Path(work))
                verdict = (
                    "out of memory"
                    if peak is None
                    else f"peak {peak:.2f} GB" + ("" if peak <= budget else ", over the budget")
                )
                print(f"  micro-batch {micro}: {verdict}", flush=True)
                return peak is not None and peak <= budget

            best = largest_fitting(fits, cfg.train.micro_batch_size, args.limit)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not best:
        print(
            "error: find-batch: not even micro-batch 1 fits; turn on parallel.activation_checkpointing or a "
            "higher parallel.zero_stage, or use a smaller model",
            file=sys.stderr,
        )
        return 2
    print(f"largest micro-batch within the budget: {best}\n  train.micro_batch_size={best}")
    return 0
