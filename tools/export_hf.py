"""Write a checkpoint as a Hugging Face Llama directory.

The same as `dist-lm export` (dist_lm/commands/export.py), with the same arguments.
"""

from dist_lm.cli import run_as_script

run_as_script("export", __name__)
