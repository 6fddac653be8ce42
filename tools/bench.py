"""Tokens/s, MFU and memory of config variants, beside plain PyTorch.

The same as `dist-lm bench` (dist_lm/commands/bench.py), with the same arguments.
"""

from dist_lm.cli import run_as_script

run_as_script("bench", __name__)
