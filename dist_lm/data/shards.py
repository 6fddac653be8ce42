"""The on-disk token format: a directory of flat token shards and a meta.json describing them.

    DIR/meta.json          format, dtype, vocab size, tokenizer hash, each shard's tokens and
                           content hashes (sha256 and xxh3_128 of the whole file, and xxh3_128
                           of a sample of its blocks: dist_lm.data.integrity checks them)
    DIR/tokenizer.json     the HF tokenizers file the tokens were made with
    DIR/train_0000.bin ... raw little-endian token ids (uint16 when the vocabulary fits, else uint32)
    DIR/val_0000.bin ...

Written into a temporary directory beside DIR and renamed when complete, so a reader never sees
half a dataset. No pickles anywhere.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
import xxhash

from dist_lm.config.schema import UserError
from dist_lm.files import CHECKSUM, replace_dir, sampled_checksum, staging_dir

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


class ShardWriter:
    """Appends documents to one split, cutting a new shard file every ``shard_tokens`` tokens."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None
        self._hashes: tuple = ()
        self._tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        if self._file is None:
            path = self.directory / f"{self.split}_{len(self.shards):04d}.bin"
            self._file, self._tokens = open(path, "wb"), 0
            self._hashes = (hashlib.sha256(), xxhash.xxh3_128())
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._file.write(data)
        for digest in self._hashes:
            digest.update(data)
        self._tokens += len(tokens)
        if self._tokens >= self.shard_tokens:
            self._finish_shard()

    def _finish_shard(self) -> None:
        path = Path(self._file.name)
        self._file.close()
        sha256, xxh = self._hashes
        self.shards.append(
            {
                "file": path.name,
                "tokens": self._tokens,
                "sha256": sha256.hexdigest(),
                "xxh3_128": f"{CHECKSUM}:{xxh.hexdigest()}",
                "sample_xxh3_128": sampled_checksum(path),
            }
        )
        self._file = None

    def close(self) -> list[dict]:
        if self._file is not None:
            self._finish_shard()
        return self.shards


class DatasetWriter:
    """Writes a dataset into a temporary directory beside ``out_dir``; ``commit`` renames it into
    place, replacing an old one only then. Leaving the ``with`` block without commit (an error,
    Ctrl-C) removes the temporary directory: no half dataset is ever left looking whole."""

    def __init__(
        self,
        out_dir: Path,
        tokenizer_json: Path,
        vocab_size: int,
        shard_tokens: int = 100_000_000,
        splits: tuple[str, ...] = SPLITS,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = staging_dir(self.out_dir.parent, f".{self.out_dir.name}.tmp-")
        self.dtype = token_dtype(vocab_size)
        self.meta = {
            "format": FORMAT,
            "dtype": self.dtype.name,
            "vocab_size": vocab_size,
            "tokenizer": "tokenizer.json",
            "tokenizer_sha256": sha256_file(tokenizer_json),
        }
        shutil.copyfile(tokenizer_json, self.tmp / "tokenizer.json")
        self.writers = {s: ShardWriter(self.tmp, s, self.dtype, shard_tokens) for s in splits}

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)  # after commit there is nothing left to remove

    def add(self, split: str, tokens: np.ndarray) -> None:
        self.writers[split].add(tokens)

    def commit(self, extra_meta: dict | None = None) -> Path:
        meta = {**self.meta, "splits": {s: w.close() for s, w in self.writers.items()}, **(extra_meta or {})}
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        replace_dir(self.tmp, self.out_dir)
        return self.out_dir


def is_dataset_file(name: str) -> bool:
    """Whether a dataset directory's entry ``name`` is one that a DatasetWriter writes."""
    split, _, rest = name.partition("_")
    return name in ("meta.json", "tokenizer.json") or (
        split in SPLITS and rest.endswith(".bin") and rest[:-4].isdigit()
    )


def write_dataset(
    out_dir: Path,
    tokenizer_json: Path,
    vocab_size: int,
    splits: dict[str, Iterable[np.ndarray]],
    shard_tokens: int = 100_000_000,
    extra_meta: dict | None = None,
) -> Path:
    """Write each split's documents (token arrays, each ending in end-of-text) atomically."""
    with DatasetWriter(out_dir, tokenizer_json, vocab_size, shard_tokens, tuple(splits)) as writer:
        for split, docs in splits.items():
            for doc in docs:
                writer.add(split, doc)
        return writer.commit(extra_meta)


def read_meta(data_dir: Path, dtype: str = "auto") -> dict:
    """meta.json of a dataset directory; for nanoGPT's layout (train.bin / val.bin and no
    meta.json) one is made up in memory from ``dtype``, which must then be given."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(
            f"data error: data.dir={data_dir} does not exist; point it at a directory of token "
            "shards with a meta.json (docs/data.md), or leave it unset for the embedded corpus"
        )
    path = data_dir / "meta.json"
    if not path.is_file():
        if (data_dir / "train.bin").is_file():
            return _nanogpt_meta(data_dir, dtype)
        raise UserError(
            f"data error: {path} is missing; data.dir must be a directory of token shards "
            "with a meta.json (docs/data.md) or nanoGPT's train.bin/val.bin"
        ) from None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" (line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ""
        raise UserError(f"data error: {path} is not valid JSON{where}; re-create the dataset") from None
    except OSError as e:
        raise UserError(f"data error: {path} cannot be read ({e.strerror or e})") from None
    problem = meta_problem(meta)
    if problem:
        raise UserError(f"data error: {path}: {problem}; re-create the dataset with dist-lm prepare")
    if dtype != "auto" and dtype != meta["dtype"]:
        raise UserError(
            f"data error: data.dtype={dtype} but {path} says {meta['dtype']}; "
            "leave data.dtype=auto when there is a meta.json"
        )
    return meta


SHARD_DTYPES = ("uint16", "uint32")


def _is_count(value, low: int = 0, high: int = 2**53) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def plain_file_name(name) -> bool:
    """A file of the dataset directory itself: a name, not a path out of it."""
    return (
        isinstance(name, str)
        and bool(name)
        and "/" not in name
        and "\\" not in name
        and not name.startswith(".")
        and "\0" not in name
    )


def meta_problem(meta) -> str | None:
    """What is wrong with a meta.json's content, naming the field, or None: the one schema it is
    read through. Shards are files inside the dataset directory, counts are counts, the token type
    is one the shards are written in and holds the vocabulary."""
    if not isinstance(meta, dict):
        return "is not a JSON object"
    if meta.get("format") != FORMAT:
        return f"format is {meta.get('format')!r}, expected {FORMAT!r}"
    if meta.get("dtype") not in SHARD_DTYPES:
        return f"dtype is {meta.get('dtype')!r}; token shards are {' or '.join(SHARD_DTYPES)}"
    vocab = meta.get("vocab_size")
    if not _is_count(vocab, 1, 2**32):
        return f"vocab_size is {vocab!r}, not a positive integer of at most 2**32"
    if np.dtype(meta["dtype"]).itemsize < token_dtype(vocab).itemsize:
        return f"dtype {meta['dtype']} cannot hold the ids of vocab_size {vocab}"
    if meta.get("tokenizer") is not None and not plain_file_name(meta["tokenizer"]):
        return f"tokenizer is {meta['tokenizer']!r}, not a file name in the dataset directory"
    if meta.get("tokenizer_sha256") is not None and not isinstance(meta["tokenizer_sha256"], str):
        return "tokenizer_sha256 is not a string"
    if meta.get("eot_id") is not None and not _is_count(meta["eot_id"], 0, vocab - 1):
        return f"eot_id is {meta['eot_id']!r}, not a token id below vocab_size {vocab}"
    splits = meta.get("splits")
    if not isinstance(splits, dict) or not splits.get("train") or set(splits) - set(SPLITS):
        return f"splits must map train (and val) to lists of shards, not {str(splits)[:80]!r}"
    for split, listed in splits.items():
        if not isinstance(listed, list):
            return f"splits.{split} is not a list of shards"
        for i, shard in enumerate(listed):
            where = f"splits.{split}[{i}]"
            if not isinstance(shard, dict) or not plain_file_name(shard.get("file")):
                return f"{where}.file must be a file name in the dataset directory, not {str(shard)[:80]!r}"
            if not _is_count(shard.get("tokens")):
                return f"{where}.tokens is {shard.get('tokens')!r}, not a count of tokens"
            for digest in ("sha256", "xxh3_128", "sample_xxh3_128"):
                if shard.get(digest) is not None and not isinstance(shard[digest], str):
                    return f"{where}.{digest} is not a string"
    return None


def fingerprint(meta: dict) -> dict:
    """What identifies a dataset for a resume: its tokenizer, and a hash of its meta.json's
    description of the shards (files, token counts, dtype, vocabulary)."""
    described = {k: meta.get(k) for k in ("dtype", "vocab_size", "tokenizer_sha256", "splits")}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
    train_tokens = sum(s["tokens"] for s in meta["splits"].get("train", []))
    return {"sha256": digest, "train_tokens": train_tokens, "tokenizer_sha256": meta.get("tokenizer_sha256")}


def _nanogpt_meta(data_dir: Path, dtype: str) -> dict:
    if dtype == "auto":
        raise UserError(
            f"data error: {data_dir} has train.bin but no meta.json, so its token type is unknown; "
            "set data.dtype=uint16 (nanoGPT's GPT-2 tokens) or data.dtype=uint32"
        )
    itemsize = np.dtype(dtype).itemsize
    splits = {}
    for split in SPLITS:
        path = data_dir / f"{split}.bin"
        if path.is_file():
            size = path.stat().st_size
            if size % itemsize:
                raise UserError(
                    f"data error: {path} has {size} bytes, not a whole number of {dtype} tokens; check data.dtype"
                )
            splits[split] = [{"file": path.name, "tokens": size // itemsize}]
    return {
        "format": FORMAT,
        "dtype": dtype,
        "vocab_size": None,
        "tokenizer": None,
        "tokenizer_sha256": None,
        "splits": splits,
        "layout": "nanogpt",
    }


def check_token_ids(
    data_dir: Path, meta: dict, vocab_size: int, budget_tokens: int = 1 << 21, random_stretches: int = 16
) -> int:
    """Cheaply check that token ids are below the model's vocabulary: the start and end of every
    shard and a few seeded random stretches of the corpus. Every rank runs this at start-up, so
    what it reads is bounded for the whole corpus (about ``budget_tokens``, at least 8,192 tokens
    per shard), not per shard: hundreds of shards must not mean gigabytes read per rank.
    Returns the number of tokens read."""
    maps = [
        (shard, tokens)
        for split in meta["splits"]
        for shard, tokens in zip(meta["splits"][split], open_split(data_dir, meta, split))
    ]
    if not maps:
        return 0
    edge = max(4096, budget_tokens // (2 * len(maps)))  # the ends of a shard are where writers go wrong
    stretches = [[(0, edge), (max(0, len(tokens) - edge), edge)] for _, tokens in maps]  # (start, length)
    rng = np.random.default_rng(0)
    for i in rng.integers(0, len(maps), size=random_stretches):
        stretches[i].append((int(rng.integers(0, max(1, len(maps[i][1]) - 4096))), 4096))
    read = 0
    for (shard, tokens), shard_stretches in zip(maps, stretches):
        pieces = [tokens[start : start + length] for start, length in shard_stretches]
        read += sum(len(piece) for piece in pieces)
        high = max(int(piece.max(initial=0)) for piece in pieces)
        if high >= vocab_size:
            raise UserError(
                f"data error: {Path(data_dir) / shard['file']} holds token id {high}, but "
                f"model.vocab_size is {vocab_size}; raise model.vocab_size above {high} "
                "or use the tokenizer the data was made with"
            )
    return read


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
            raise UserError(
                f"data error: shard {path} has {path.stat().st_size} bytes but meta.json says "
                f"{shard['tokens']} {dtype.name} tokens ({expected} bytes); re-create the dataset"
            )
        maps.append(np.memmap(path, dtype=dtype, mode="r"))
    return maps
