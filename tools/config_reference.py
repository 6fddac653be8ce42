"""Print the config reference (markdown) generated from the schema's field docstrings, or
refresh the copy in docs/configuration.md.

    python tools/config_reference.py                                # print it
    python tools/config_reference.py --update docs/configuration.md # rewrite the copy between its markers
"""

import argparse
from pathlib import Path

from dist_lm.config.reference import reference_markdown, update_page

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--update", type=Path, metavar="PAGE", help="rewrite the reference in this file")
args = parser.parse_args()
if args.update:
    update_page(args.update)
else:
    print(reference_markdown())
