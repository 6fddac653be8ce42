"""Validation loss of a checkpoint.

The same as `dist-lm evaluate` (dist_lm/commands/evaluate.py), with the same arguments.
"""

from dist_lm.cli import run_as_script

run_as_script("evaluate", __name__)
