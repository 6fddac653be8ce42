"""Print the config reference (markdown) generated from dist_lm/config.py; README.md embeds it.

    python tools/config_reference.py > /tmp/ref.md
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dist_lm.config_doc import reference_markdown  # noqa: E402

print(reference_markdown())
