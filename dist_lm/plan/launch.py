"""The command lines that run a plan: the launch templates of a checkout (launchers/, slurm/), or,
for dist-lm installed as a package (no templates beside it), `dist-lm train` and the launchers'
own module forms; and the plan printed with them (dist-lm plan, --plan)."""

from __future__ import annotations

from pathlib import Path

from dist_lm.plan.planner import Plan

# A checkout has its launch templates beside the package; an installed package has none.
CHECKOUT = Path(__file__).resolve().parents[2]
TEMPLATES = CHECKOUT / "launchers" / "torchrun.sh"


def launch_commands(plan: Plan, from_checkout: bool | None = None) -> dict[str, str]:
    """The command for each launcher that runs this plan on the described machine: the templates
    of a checkout, or (``from_checkout`` false; default: whether the templates are beside this
    package) the installed command and the launchers' module forms."""
    from_checkout = TEMPLATES.is_file() if from_checkout is None else from_checkout
    args = " ".join(_quote(a) for a in plan.explicit_args())
    if not from_checkout:
        return _installed_commands(plan, args)
    m = plan.machine
    if not m.has_gpu:
        return {"python": f"python launchers/pretrain.py {args}"}
    g, n = m.gpus_per_node, m.nodes
    if n == 1:
        cmds = {
            "torchrun": f"launchers/torchrun.sh {args}",
            "deepspeed": f"launchers/deepspeed.sh {args}",
            "mpirun": f"NP={g} launchers/mpirun.sh {args}",
        }
        if g == 1:
            cmds = {"python": f"python launchers/pretrain.py {args}", **cmds}
    else:
        hosts = " ".join(f"node{i}" for i in range(n))
        cmds = {
            "torchrun": f"NNODES={n} NODE_RANK=<0..{n - 1}> MASTER_ADDR=node0 launchers/torchrun.sh {args}"
            "  # on every node",
            "deepspeed": f'HOSTS="{hosts}" GPUS_PER_NODE={g} MASTER_ADDR=node0 launchers/deepspeed.sh {args}',
            "mpirun": f"NP={g * n} HOSTS={','.join(f'node{i}:{g}' for i in range(n))} MASTER_ADDR=node0 "
            f"launchers/mpirun.sh {args}",
        }
    cmds["sbatch"] = f"sbatch --nodes={n} --gpus-per-node={g} --ntasks-per-node={g} slurm/pretrain.sh " + " ".join(
        _quote(a) for a in [plan.preset, *plan.choices, *plan.user_overrides]
    )
    return cmds


def _installed_commands(plan: Plan, args: str) -> dict[str, str]:
    """What runs the plan from `pip install dist-lm`: the dist-lm command, torchrun and the deepspeed
    launcher by module (the SLURM and mpirun templates come with a checkout)."""
    m = plan.machine
    if not m.has_gpu or m.gpus_per_node * m.nodes == 1:
        return {"dist-lm": f"dist-lm train {args}"}
    g, n = m.gpus_per_node, m.nodes
    if n == 1:
        return {
            "torchrun": f"torchrun --nproc_per_node {g} -m dist_lm train {args}",
            "deepspeed": f"deepspeed --num_gpus {g} --module dist_lm train {args}",
        }
    hosts = ",".join(f"node{i}:{g}" for i in range(n))
    return {
        "torchrun": f"torchrun --nnodes {n} --nproc_per_node {g} --node_rank <0..{n - 1}> --master_addr node0 "
        f"--master_port 29500 -m dist_lm train {args}  # on every node",
        "deepspeed": f"deepspeed --hostfile <a file of lines 'nodeI slots={g}' for {hosts}> --master_addr node0 "
        f"--module dist_lm train {args}",
    }


def _quote(arg: str) -> str:
    return arg if all(c.isalnum() or c in "-_.=/:,+" for c in arg) else "'" + arg.replace("'", "'\\''") + "'"


def format_plan(plan: Plan) -> str:
    """The plan and the command for each launcher, as printed by dist-lm plan and --plan."""
    lines = plan.summary() + [
        "",
        "resolved settings: " + " ".join(plan.choices or ["(the preset as it is)"]),
        "",
        "launch it with any of:",
    ]
    lines += [f"  {name:<9} {cmd}" for name, cmd in launch_commands(plan).items()]
    return "\n".join(lines)
