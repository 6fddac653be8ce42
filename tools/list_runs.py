"""List runs and their checkpoints.

The same as `dist-lm runs` (dist_lm/commands/runs.py), with the same arguments.
"""

from dist_lm.cli import run_as_script

run_as_script("runs", __name__)
