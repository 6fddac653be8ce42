"""Which dataset a run reads, checked against the model before torch is imported.

Only numpy and the file system here: the launcher resolves the data first, so a wrong data.dir,
a damaged shard or a vocabulary mismatch fails in a fraction of a second with one line, not
after seconds of importing torch and DeepSpeed. :mod:`dist_lm.data.sampler` turns the windows defined
here into batches on the device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dist_lm.data import corpus
from dist_lm.data import shards
from dist_lm.config.schema import Config, ConfigError, UserError, replaced


class Windows:
    """The windows of one split (seq_len + 1 tokens each), indexed globally across its shards."""

    def __init__(self, maps: list[np.memmap], seq_len: int, where: str):
        self.maps, self.seq_len = maps, seq_len
        counts = np.array([max(0, (len(m) - 1) // seq_len) for m in maps], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.n = int(self.starts[-1])
        if self.n == 0:
            total = sum(len(m) for m in maps)
            raise UserError(f"data error: {where} holds {total} tokens, fewer than one window of "
                            f"model.seq_len + 1 = {seq_len + 1}; use more data or a smaller model.seq_len")

    @classmethod
    def of_split(cls, data_dir: Path, meta: dict, split: str, seq_len: int) -> "Windows":
        return cls(shards.open_split(data_dir, meta, split), seq_len, f"{data_dir} ({split} split)")

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """Windows ``ids`` as an int64 array (len(ids), seq_len + 1)."""
        out = np.empty((len(ids), self.seq_len + 1), dtype=np.int64)
        shard_of = np.searchsorted(self.starts, ids, side="right") - 1
        for row, (i, s) in enumerate(zip(ids, shard_of)):
            begin = int(i - self.starts[s]) * self.seq_len
            out[row] = self.maps[s][begin:begin + self.seq_len + 1]
        return out


def eval_split(meta: dict) -> str:
    """The split evaluation reads: val, or train for a dataset made without one."""
    return "val" if meta["splits"].get("val") else "train"


def padded_vocab_size(tokens: int) -> int:
    """The model's vocabulary for a tokenizer of ``tokens``: a multiple of 64, which suits the
    matmul kernels."""
    return (tokens + 63) // 64 * 64


def resolve_data(cfg: Config) -> tuple[Config, Path, dict]:
    """The config with model.vocab_size taken from the data when it is null (a new config: the
    given one is left as it is), the dataset directory and its meta.json, checked against the model."""
    data_dir = Path(cfg.data.dir) if cfg.data.dir else corpus.prepare(cfg.data.cache_dir, cfg.data.embedded_vocab_size)
    meta = shards.read_meta(data_dir, cfg.data.dtype)
    if meta["vocab_size"] is None and cfg.model.vocab_size is None:
        raise ConfigError("model.vocab_size", f"{data_dir} has no meta.json to take the vocabulary size from; "
                          "set it (50304 for nanoGPT's GPT-2 tokens)")
    if cfg.model.vocab_size is None:
        cfg = replaced(cfg, "model", vocab_size=padded_vocab_size(meta["vocab_size"]))
    elif meta["vocab_size"] is not None and cfg.model.vocab_size < meta["vocab_size"]:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the vocabulary of "
                          f"{data_dir / 'meta.json'} ({meta['vocab_size']}); raise it or leave it null")
    shards.check_token_ids(data_dir, meta, cfg.model.vocab_size)
    for split in {"train", eval_split(meta)}:
        Windows.of_split(data_dir, meta, split, cfg.model.seq_len)  # at least one window of each
    return cfg, data_dir, meta
