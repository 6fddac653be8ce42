"""A grid or random search over config keys, one run per trial.

The same as `dist-lm sweep` (dist_lm/commands/sweep.py), with the same arguments.
"""

from dist_lm.cli import run_as_script

run_as_script("sweep", __name__)
