"""Plots and rankings of a run or a sweep.

The same as `dist-lm analyze` (dist_lm/commands/analyze.py), with the same arguments.
"""

from dist_lm.cli import run_as_script

run_as_script("analyze", __name__)
