"""The work of an unfinished `dist-lm prepare`: each input file's tokens, kept on disk as the file
is finished, so that the same command started again skips the files already done.

    OUT/../.OUT.partial/
        arguments.json      what the output depends on (inputs with sizes and times, settings)
        tokenizer.json      the tokenizer, once trained or loaded
        files/00003/        one finished input: train.bin, val.bin (uint32 tokens), train.len,
                            val.len (the lengths of the arrays as they were tokenized) and
                            done.json (its documents, characters, skipped lines), written last
        files/00004.tmp/    the input being tokenized; removed when work starts again

The dataset is then assembled from the finished files in input order, replaying the same arrays
into the shard writer, so its bytes are those of a run that was never interrupted. Started with
other arguments, the partial work of the earlier run is discarded. The directory goes away when
the dataset is complete, or when bad input stops the run (nothing of it would be reused).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from dist_lm.data.readers import ReadStats
from dist_lm.files import write_atomic

SPLITS = ("train", "val")


def arguments_of(inputs: list[Path], settings: dict) -> dict:
    """What the output depends on: every input's path, size and modification time, and the settings."""

    def describe(path: Path) -> list:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        return [str(path.resolve()), sum(f.stat().st_size for f in files), max(f.stat().st_mtime_ns for f in files)]

    return {"inputs": [describe(p) for p in inputs], **settings}


class PartialWork:
    def __init__(self, out: Path, arguments: dict):
        self.root = out.parent / f".{out.name}.partial"
        self.files = self.root / "files"
        self.arguments = json.loads(json.dumps(arguments))  # as it reads back
        saved = self.root / "arguments.json"
        self.resumed = saved.is_file() and json.loads(saved.read_text()) == self.arguments
        if not self.resumed:
            shutil.rmtree(self.root, ignore_errors=True)
        self.files.mkdir(parents=True, exist_ok=True)
        for stale in self.files.glob("*.tmp"):
            shutil.rmtree(stale)
        write_atomic(saved, json.dumps(self.arguments))

    def done(self, index: int) -> ReadStats | None:
        """The stats of input ``index`` if it was finished, else None."""
        path = self.files / f"{index:05d}" / "done.json"
        return ReadStats(**json.loads(path.read_text())) if path.is_file() else None

    def tokenizer(self) -> str | None:
        path = self.root / "tokenizer.json"
        return path.read_text() if path.is_file() else None

    def keep_tokenizer(self, tokenizer_json: str) -> None:
        write_atomic(self.root / "tokenizer.json", tokenizer_json)

    def start_file(self, index: int) -> "FileTokens":
        return FileTokens(self.files / f"{index:05d}")

    def replay(self, index: int, add) -> dict[str, int]:
        """Call ``add(split, array)`` with input ``index``'s arrays, in the order they were made;
        returns its tokens per split."""
        d, tokens = self.files / f"{index:05d}", {}
        for split in SPLITS:
            lengths = np.fromfile(d / f"{split}.len", dtype=np.int64)
            data = np.memmap(d / f"{split}.bin", dtype=np.uint32, mode="r") if lengths.sum() else np.zeros(0, np.uint32)
            offset = 0
            for n in lengths:
                add(split, data[offset : offset + n])
                offset += n
            tokens[split] = int(offset)
        return tokens

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class FileTokens:
    """One input's tokens as they arrive, in a temporary directory until ``finish``."""

    def __init__(self, final: Path):
        self.final, self.tmp = final, final.with_name(final.name + ".tmp")
        self.tmp.mkdir()
        self.bins = {s: open(self.tmp / f"{s}.bin", "wb") for s in SPLITS}
        self.lens = {s: open(self.tmp / f"{s}.len", "wb") for s in SPLITS}

    def add(self, split: str, tokens: np.ndarray) -> None:
        self.bins[split].write(np.ascontiguousarray(tokens, dtype=np.uint32).tobytes())
        self.lens[split].write(np.int64(len(tokens)).tobytes())

    def finish(self, stats: ReadStats) -> None:
        for f in [*self.bins.values(), *self.lens.values()]:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        (self.tmp / "done.json").write_text(json.dumps(stats.__dict__))
        os.rename(self.tmp, self.final)
