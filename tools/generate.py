"""Sample text from a checkpoint.

The same as `dist-lm generate` (dist_lm/commands/generate.py), with the same arguments.
"""

from dist_lm.cli import run_as_script

run_as_script("generate", __name__)
