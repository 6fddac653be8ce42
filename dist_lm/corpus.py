"""The embedded corpus: English prose every Python installation carries, no download needed.

The help topics of the language reference (``pydoc_data.topics``) and the docstrings of the
standard library's modules, classes and functions. Prepared once into the cache directory:
a byte-level BPE tokenizer trained on it and shards in the format of :mod:`dist_lm.shards`.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

from dist_lm import shards

EOT = "<|endoftext|>"
VERSION = 1  # bump when the text selection or the preparation changes
VAL_EVERY = 10  # every 10th document (by a hash of its text) goes to validation

# Parts of the standard library that are tests, tools or vendored code rather than documentation.
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo",
             "__pycache__", "ensurepip", "pydoc_data"}
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

    Several ranks may arrive at once: each prepares into its own temporary directory and the
    first rename wins; the content is deterministic, so the others discard theirs.
    """
    tag = f"v{VERSION}-py{sys.version_info.major}{sys.version_info.minor}-bpe{vocab_size}"
    out = cache_root(cache_dir) / f"embedded-{tag}"
    if (out / "meta.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    docs = documents()
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        tokenizer_path = Path(work) / "tokenizer.json"
        tokenizer = train_bpe(docs, vocab_size)
        tokenizer.save(str(tokenizer_path))
        eot = tokenizer.token_to_id(EOT)
        encoded = [np.array(e.ids + [eot], dtype=np.int64) for e in tokenizer.encode_batch(docs)]
        is_val = [_doc_hash(d) % VAL_EVERY == 0 for d in docs]
        splits = {"train": (e for e, v in zip(encoded, is_val) if not v),
                  "val": (e for e, v in zip(encoded, is_val) if v)}
        staged = Path(work) / "dataset"
        shards.write_dataset(staged, tokenizer_path, tokenizer.get_vocab_size(), splits,
                             extra_meta={"source": f"embedded corpus {tag}", "eot_id": eot})
        try:
            os.rename(staged, out)
        except OSError:  # another process won the race; its copy is identical
            if not (out / "meta.json").is_file():
                raise
    return out


def _doc_hash(doc: str) -> int:
    return int.from_bytes(hashlib.sha256(doc.encode()).digest()[:8], "little")


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style) trained on ``texts``, with EOT as special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer
