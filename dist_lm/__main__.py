"""``python -m dist_lm COMMAND ...``: the same as the ``dist-lm`` command."""

import sys

from dist_lm.cli import main

if __name__ == "__main__":
    sys.exit(main())
