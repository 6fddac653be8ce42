"""The on-disk token format: a directory of flat token shards and a meta.json describing them.

    DIR/meta.json          format, dtype, vocab size, tokenizer hash, each shard's tokens and sha256
    DIR/tokenizer.json     the HF tokenizers file the tokens were made with
    DIR/train_0000.bin ... raw little-endian token ids (uint16 when the vocabulary fits, else uint32)
    DIR/val_0000.bin ...

Written into a temporary directory beside DIR and renamed when complete, so a reader never sees
half a dataset. No pickles anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from dist_lm.config import UserError

FORMAT = "dist-lm-shards/1"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_dataset(out_dir: Path, tokenizer_json: Path, vocab_size: int,
                  splits: dict[str, Iterable[np.ndarray]], shard_tokens: int = 100_000_000,
                  extra_meta: dict | None = None) -> Path:
    """Write token arrays (one per document, each ending in end-of-text) as shards, atomically.

    Returns out_dir. If out_dir already exists it is replaced only after the new one is complete.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        meta = {"format": FORMAT, "dtype": dtype.name, "vocab_size": vocab_size,
                "tokenizer": "tokenizer.json", "tokenizer_sha256": sha256_file(tokenizer_json),
                "splits": {}, **(extra_meta or {})}
        shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
        for split, docs in splits.items():
            meta["splits"][split] = _write_split(tmp, split, docs, dtype, shard_tokens)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_split(tmp: Path, split: str, docs: Iterable[np.ndarray], dtype: np.dtype, shard_tokens: int) -> list[dict]:
    shards: list[dict] = []
    buffer: list[np.ndarray] = []
    buffered = 0

    def flush() -> None:
        nonlocal buffer, buffered
        path = tmp / f"{split}_{len(shards):04d}.bin"
        np.concatenate(buffer).astype(dtype).tofile(path)
        shards.append({"file": path.name, "tokens": buffered, "sha256": sha256_file(path)})
        buffer, buffered = [], 0

    for doc in docs:
        buffer.append(doc)
        buffered += len(doc)
        if buffered >= shard_tokens:
            flush()
    if buffered:
        flush()
    return shards


def read_meta(data_dir: Path) -> dict:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data error: data.dir={data_dir} does not exist; point it at a directory of token "
                        "shards with a meta.json (README, 'Data'), or leave it unset for the embedded corpus")
    path = data_dir / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"data error: {path} is missing; data.dir must be a directory of token shards "
                        "with a meta.json (README, 'Data')") from None
    except json.JSONDecodeError as e:
        raise UserError(f"data error: {path} is not valid JSON (line {e.lineno}); re-create the dataset") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"data error: {path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def open_split(data_dir: Path, meta: dict, split: str) -> list[np.memmap]:
    """Memory-map every shard of a split, checking each file's size against meta.json."""
    dtype = np.dtype(meta["dtype"])
    maps = []
    for shard in meta["splits"].get(split, []):
        path = Path(data_dir) / shard["file"]
        if not path.is_file():
            raise UserError(f"data error: shard {path} listed in meta.json is missing; re-create the dataset")
        expected = shard["tokens"] * dtype.itemsize
        if path.stat().st_size != expected:
            raise UserError(f"data error: shard {path} has {path.stat().st_size} bytes but meta.json says "
                            f"{shard['tokens']} {dtype.name} tokens ({expected} bytes); re-create the dataset")
        maps.append(np.memmap(path, dtype=dtype, mode="r"))
    return maps
