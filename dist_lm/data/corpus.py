"""The embedded corpus: English prose every Python installation carries, no download needed.

The help topics of the language reference (``pydoc_data.topics``) and the docstrings of the
standard library's modules, classes and functions. Prepared once into the cache directory:
a byte-level BPE tokenizer trained on it and shards in the format of :mod:`dist_lm.data.shards`.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

from dist_lm.data import prepare as text_prep

VERSION = 2  # bump when the text selection or the preparation changes
VAL_FRACTION = 0.1

# Parts of the standard library that are tests, tools or vendored code rather than documentation.
SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "site-packages",
    "dist-packages",
    "lib2to3",
    "turtledemo",
    "__pycache__",
    "ensurepip",
    "pydoc_data",
}
MIN_CHARS = 100


def documents() -> list[str]:
    """The corpus as a list of documents, in a fixed order.

    Docstrings are read with ``ast`` from the standard library's source files, never imported,
    so nothing runs and the selection does not depend on which optional modules import.
    """
    from pydoc_data.topics import topics

    docs = [topics[name].strip() for name in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docs.append(ast.get_docstring(node) or "")
    return [d for d in docs if len(d) >= MIN_CHARS]


def cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir or os.environ.get("DIST_LM_CACHE") or Path.home() / ".cache" / "dist_lm")


def prepare(cache_dir: str | None, vocab_size: int) -> Path:
    """The embedded corpus as a dataset directory, prepared on first use and reused after.

    It goes through the same pipeline as any other text (dist_lm.data.prepare, behind
    `dist-lm prepare`). Several ranks may arrive at once: each prepares into its own
    temporary directory and the first rename wins; the content is deterministic, so the others
    discard theirs.
    """
    tag = f"v{VERSION}-py{sys.version_info.major}{sys.version_info.minor}-bpe{vocab_size}"
    out = cache_root(cache_dir) / f"embedded-{tag}"
    if (out / "meta.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        source = Path(work) / "python-docs.jsonl"
        source.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents()))
        staged = Path(work) / "dataset"
        text_prep.prepare(
            [source],
            staged,
            None,
            vocab_size,
            workers=1,
            val_fraction=VAL_FRACTION,
            seed=0,
            command=f"embedded corpus {tag}",
            progress=False,
        )
        try:
            os.rename(staged, out)
        except OSError:  # another process won the race; its copy is identical
            if not (out / "meta.json").is_file():
                raise
    return out
