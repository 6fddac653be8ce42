"""Tokenize text into token shards for data.dir.

The same as `dist-lm prepare` (dist_lm/commands/prepare.py), with the same arguments.
"""

from dist_lm.cli import run_as_script

run_as_script("prepare", __name__)
