"""Pretrain a model: the same file under deepspeed, torchrun, mpirun, srun, or plain python.

The same as `dist-lm train` (dist_lm/commands/train.py), with the same arguments.
"""

from dist_lm.cli import run_as_script

run_as_script("train", __name__)
