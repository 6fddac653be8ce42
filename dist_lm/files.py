"""Writing a file so that no reader, and no crash, ever sees half of it."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path | str, text: str, durable: bool = False) -> None:
    """Write ``text`` to a temporary name beside ``path``, then rename it over ``path`` (a rename
    is atomic). ``durable``: fsync first, for files that say something else is complete
    (a checkpoint's state.json, ``latest``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
