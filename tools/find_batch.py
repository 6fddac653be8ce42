"""The largest micro-batch that fits this machine's GPU, measured.

The same as `dist-lm find-batch` (dist_lm/commands/find_batch.py), with the same arguments.
"""

from dist_lm.cli import run_as_script

run_as_script("find-batch", __name__)
