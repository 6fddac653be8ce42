"""The ``dist-lm`` command: one subcommand per job, each a module of :mod:`dist_lm.commands`.

    dist-lm train --preset debug train.max_steps=5      # also: python -m dist_lm train ...
    torchrun --nproc_per_node 2 -m dist_lm train --preset debug
    deepspeed --num_gpus 2 --module dist_lm train --preset debug

``launchers/pretrain.py`` and the scripts in ``tools/`` are the same commands under their old
paths (:func:`run_as_script`), with the same arguments.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> what it does (kept here, so that --help imports no torch)
COMMANDS = {
    "train": "train a model (under any launcher; --config auto plans for this machine)",
    "prepare": "tokenize text (txt, jsonl, parquet, arrow, saved datasets) into token shards for data.dir",
    "plan": "show the plan --config auto would choose, for this machine or a described one",
    "find-batch": "the largest micro-batch that fits this machine's GPU, measured by short runs",
    "evaluate": "validation loss of a checkpoint",
    "generate": "sample text from a checkpoint",
    "export": "write a checkpoint as a Hugging Face Llama directory (transformers loads it: pip install transformers)",
    "bench": "tokens/s, MFU and memory of config variants, beside plain PyTorch",
    "sweep": "a grid or random search over config keys, one run per trial",
    "analyze": "plots and rankings of a run or a sweep",
    "runs": "list runs and their checkpoints",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return "usage: dist-lm COMMAND [ARGS...]   (dist-lm COMMAND --help for its arguments)\n\ncommands:\n" + "\n".join(
        lines
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher puts --local_rank=N before the script's own arguments, so before the
    # subcommand under --module: it belongs to the subcommand.
    launcher_args = [a for a in argv if a.startswith("--local_rank")]
    argv = [a for a in argv if not a.startswith("--local_rank")]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: dist-lm has no command {name!r}\n{usage()}", file=sys.stderr)
        return 2
    return run(name, rest + launcher_args, prog=f"dist-lm {name}")


def run(name: str, argv: list[str], prog: str) -> int:
    """Run one subcommand with ``argv``; ``prog`` is the name its --help and errors show."""
    sys.argv[0] = prog  # argparse names the program after it
    try:
        status = importlib.import_module(f"dist_lm.commands.{name.replace('-', '_')}").main(argv)
    except KeyboardInterrupt:  # Ctrl-C before a command takes it over (a training run checkpoints first)
        print(f"error: {prog}: interrupted (Ctrl-C); what it was writing was not left half-written", file=sys.stderr)
        return 130
    return int(status or 0)


def run_as_script(name: str, module_name: str) -> None:
    """The body of a front-end script (launchers/pretrain.py, tools/*.py): the subcommand
    ``name`` with the script's own arguments, when the script is run rather than imported."""
    if module_name == "__main__":
        sys.exit(run(name, sys.argv[1:], prog=sys.argv[0]))
