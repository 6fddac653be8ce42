"""Print the config reference (markdown) generated from dist_lm/config/schema.py, or refresh README.md's copy.

    python tools/config_reference.py                    # print it
    python tools/config_reference.py --update README.md # rewrite the copy between the README's markers
"""

import argparse
from pathlib import Path


from dist_lm.config.reference import reference_markdown, update_readme

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--update", type=Path, metavar="README", help="rewrite the reference in this file")
args = parser.parse_args()
if args.update:
    update_readme(args.update)
else:
    print(reference_markdown())
