"""Show the plan that --config auto chooses, for this machine or a described one.

The same as `dist-lm plan` (dist_lm/commands/plan.py), with the same arguments.
"""

from dist_lm.cli import run_as_script

run_as_script("plan", __name__)
