"""Print the --config auto plan for this machine or a described one, with the launch commands.

    dist-lm plan                                              # this machine
    dist-lm plan --gpus 8 --gpu-mem 80 --nodes 4 --gpu-name H100
    dist-lm plan --gpus 1 --gpu-mem 12 --gpu-name "RTX 3060" train.global_batch_size=128
    dist-lm plan --nodes 16 --gpus-per-node 8 --gpu-name H100 --link ib-400   # ranked by speed

With --link the layouts that fit are ranked by the scaling model (docs/planner.md): each one's
step time, tokens/s per GPU, efficiency against one node and GPU-hours; the plan is the fastest.

Overrides (section.key=value) are constraints the plan keeps, as on the training command line.
Nothing is trained and no process group is started.
"""

from __future__ import annotations

import argparse
import sys

from dist_lm.commands.arguments import Parser, integer, number
from dist_lm.config.schema import UserError
from dist_lm.plan.launch import format_plan
from dist_lm.plan.planner import make_plan, plan_for_this_machine
from dist_lm.plan.ranking import fastest_plan
from dist_lm.plan.scaling import LINKS
from dist_lm.runtime.hardware import Machine
from dist_lm.train.restore import resumed_settings


def compute_capability(text: str) -> tuple[int, int]:
    """An argument type: a CUDA compute capability, major.minor (8.6)."""
    major, dot, minor = text.partition(".")
    if not (dot and major.isdigit() and minor.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a compute capability like 8.6")
    return int(major), int(minor)


def main(argv: list[str] | None = None) -> int:
    p = Parser(__doc__)
    p.add_argument(
        "--gpus", "--gpus-per-node", type=integer(0, 4096), help="GPUs per node of the described machine (0: CPU only)"
    )
    p.add_argument(
        "--gpu-mem", type=number(0, 1e6, low_open=True), default=80.0, help="memory of one GPU in GB (default 80)"
    )
    p.add_argument(
        "--gpu-name",
        default="",
        help="GPU model, e.g. 'H100' or 'RTX 4090' (for its peak FLOP/s and bf16 support; default unknown)",
    )
    p.add_argument(
        "--compute-capability",
        type=compute_capability,
        help="e.g. 8.6; default: from the name (bf16 unless a pre-Ampere card)",
    )
    p.add_argument("--nodes", type=integer(1, 1 << 20), default=1, help="nodes (default 1)")
    p.add_argument("--cpu-cores", type=integer(1, 1 << 20), default=32, help="CPU cores per node (default 32)")
    p.add_argument("--ram", type=number(0, 1e9, low_open=True), default=256.0, help="RAM per node in GB (default 256)")
    p.add_argument(
        "--link",
        choices=sorted(LINKS),
        help="the link between nodes (or nvlink for one node): rank the layouts by predicted speed over it",
    )
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args(argv)
    try:
        resumed = resumed_settings(args.overrides)  # a run that resumes keeps what its checkpoint needs
        if args.gpus is None:
            plan = plan_for_this_machine(args.overrides, args.nodes, None, resumed)
        else:
            machine = Machine(
                args.gpus,
                args.gpu_name,
                args.gpu_mem if args.gpus else 0.0,
                args.compute_capability,
                args.nodes,
                args.cpu_cores,
                args.ram,
            )
            plan = make_plan(machine, args.overrides, resumed=resumed)
        ranking: list[str] = []
        if args.link:
            if not plan.machine.has_gpu or plan.machine.peak_flops is None:
                raise UserError(
                    f"--link: the scaling model needs a GPU whose peak FLOP/s it knows (--gpu-name, e.g. H100; "
                    f"the table in dist_lm/runtime/hardware.py), not {plan.machine.gpu_name or 'none'}"
                )
            plan, ranking = fastest_plan(plan, LINKS[args.link], args.overrides, resumed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join([*ranking, ""] if ranking else []) + format_plan(plan))
    return 0
