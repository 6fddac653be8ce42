"""Which dataset a run reads, checked against the model before torch is imported.

Only numpy and the file system here: the launcher resolves the data first, so a wrong data.dir,
a damaged shard or a vocabulary mismatch fails in a fraction of a second with one line, not
after seconds of importing torch and DeepSpeed. :mod:`dist_lm.data.sampler` turns the windows defined
here into batches on the device.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_lm.config.schema import Config, ConfigError, UserError, replaced
from dist_lm.data import corpus, shards


class Windows:
    """The windows of one split (seq_len + 1 tokens each), indexed globally across its shards."""

    def __init__(self, maps: list[np.memmap], seq_len: int, where: str):
        self.maps, self.seq_len = maps, seq_len
        counts = np.array([max(0, (len(m) - 1) // seq_len) for m in maps], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.n = int(self.starts[-1])
        if self.n == 0:
            total = sum(len(m) for m in maps)
            raise UserError(
                f"data error: {where} holds {total} tokens, fewer than one window of "
                f"model.seq_len + 1 = {seq_len + 1}; use more data or a smaller model.seq_len"
            )

    @classmethod
    def of_split(cls, data_dir: Path, meta: dict, split: str, seq_len: int) -> "Windows":
        return cls(shards.open_split(data_dir, meta, split), seq_len, f"{data_dir} ({split} split)")

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """Windows ``ids`` as an int64 array (len(ids), seq_len + 1)."""
        out = np.empty((len(ids), self.seq_len + 1), dtype=np.int64)
        shard_of = np.searchsorted(self.starts, ids, side="right") - 1
        for row, (i, s) in enumerate(zip(ids, shard_of)):
            begin = int(i - self.starts[s]) * self.seq_len
            out[row] = self.maps[s][begin : begin + self.seq_len + 1]
        return out


def eval_split(meta: dict) -> str:
    """The split evaluation reads: val, or train for a dataset made without one."""
    return "val" if meta["splits"].get("val") else "train"


def padded_vocab_size(tokens: int) -> int:
    """The model's vocabulary for a tokenizer of ``tokens``: a multiple of 64, which suits the
    matmul kernels."""
    return (tokens + 63) // 64 * 64


@dataclass(frozen=True)
class Source:
    """One dataset a run trains on: data.dir (or the embedded corpus), or one of data.mixture."""

    name: str
    dir: Path
    meta: dict
    weight: float  # normalised: the weights of a run's sources sum to 1


@dataclass(frozen=True)
class ResolvedData:
    """The datasets of a run, checked against its model; ``config`` has model.vocab_size filled
    in from them when it was null (a new config: the given one is left as it is)."""

    config: Config
    sources: list[Source]

    @property
    def dir(self) -> Path:
        """The first source's directory, whose tokenizer every source shares."""
        return self.sources[0].dir

    @property
    def meta(self) -> dict:
        return self.sources[0].meta

    def fingerprint(self) -> dict:
        """What identifies the data for a resume: a dataset's own fingerprint, or for a mixture
        one over its sources' in order. The weights are not in it: they may change on resume."""
        if len(self.sources) == 1:
            return shards.fingerprint(self.meta)
        parts = [shards.fingerprint(s.meta) for s in self.sources]
        digest = hashlib.sha256(json.dumps([p["sha256"] for p in parts]).encode()).hexdigest()
        return {
            "sha256": digest,
            "train_tokens": sum(p["train_tokens"] for p in parts),
            "tokenizer_sha256": parts[0]["tokenizer_sha256"],
        }

    def describe(self) -> str:
        if len(self.sources) == 1:
            return str(self.dir)
        return "mixture of " + ", ".join(f"{s.name} {s.weight:.3g} ({s.dir})" for s in self.sources)


def normalised(weights: list[float]) -> list[float]:
    """Positive, finite weights scaled to sum to 1, without overflow: divided by the largest first
    (1e308 and 1e308 sum to inf, which would make both 0)."""
    top = max(weights)
    scaled = [w / top for w in weights]
    return [w / sum(scaled) for w in scaled]


def resolve_data(cfg: Config) -> ResolvedData:
    """The datasets of ``cfg`` (data.mixture, data.dir or the embedded corpus), each checked
    against the model before torch is imported; a mixture's must share one tokenizer."""
    if cfg.data.mixture:
        named = [
            (m.label, Path(m.dir), w)
            for m, w in zip(cfg.data.mixture, normalised([m.weight for m in cfg.data.mixture]))
        ]
    else:
        data_dir = (
            Path(cfg.data.dir) if cfg.data.dir else corpus.prepare(cfg.data.cache_dir, cfg.data.embedded_vocab_size)
        )
        named = [(data_dir.name, data_dir, 1.0)]
    metas = [shards.read_meta(d, cfg.data.dtype) for _, d, _ in named]
    tokenizers = {m.get("tokenizer_sha256") for m in metas}
    if len(tokenizers) > 1:
        listed = ", ".join(f"{d} {str(m.get('tokenizer_sha256'))[:12]}" for (_, d, _), m in zip(named, metas))
        raise ConfigError(
            "data.mixture",
            f"its datasets were made with different tokenizers ({listed}); prepare them all with one --tokenizer",
        )
    vocab = max((m["vocab_size"] for m in metas if m["vocab_size"] is not None), default=None)
    if vocab is None and cfg.model.vocab_size is None:
        raise ConfigError(
            "model.vocab_size",
            f"{named[0][1]} has no meta.json to take the vocabulary size from; "
            "set it (50304 for nanoGPT's GPT-2 tokens)",
        )
    if cfg.model.init_from:
        check_model_tokenizer(Path(cfg.model.init_from), [(d, m) for (_, d, _), m in zip(named, metas)])
    if cfg.model.vocab_size is None:
        cfg = replaced(cfg, "model", vocab_size=padded_vocab_size(vocab))
    elif vocab is not None and cfg.model.vocab_size < vocab:
        raise ConfigError(
            "model.vocab_size",
            f"{cfg.model.vocab_size} is smaller than the vocabulary of "
            f"{named[0][1] / 'meta.json'} ({vocab}); raise it or leave it null",
        )
    if cfg.data.document_mask and metas[0].get("eot_id") is None:
        raise ConfigError(
            "data.document_mask",
            f"needs the end-of-text id that closes each document, and "
            f"{named[0][1]} has none in a meta.json; prepare the data with dist-lm prepare",
        )
    for (_, data_dir, _), meta in zip(named, metas):
        shards.check_token_ids(data_dir, meta, cfg.model.vocab_size)
        for split in {"train", eval_split(meta)}:
            Windows.of_split(data_dir, meta, split, cfg.model.seq_len)  # at least one window of each
    return ResolvedData(cfg, [Source(name, d, meta, w) for (name, d, w), meta in zip(named, metas)])


def check_model_tokenizer(model_dir: Path, datasets: list[tuple[Path, dict]]) -> None:
    """Refuse data whose tokens are not the model.init_from model's: its tokenizer.json, by hash
    (`dist-lm prepare --tokenizer MODEL_DIR` keeps the model's file as it is)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(
            "model.init_from",
            f"{model_dir} has no tokenizer.json, so the data's tokens cannot be checked against the model's; "
            "save its tokenizer there (transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))",
        )
    model_sha = shards.sha256_file(path)
    for data_dir, meta in datasets:
        if meta.get("tokenizer_sha256") != model_sha:
            made_with = str(meta.get("tokenizer_sha256") or "no tokenizer")[:12]
            raise ConfigError(
                "model.init_from",
                f"{data_dir} was made with tokenizer {made_with}, not the model's {path} ({model_sha[:12]}); "
                f"prepare the data with the model's tokenizer: dist-lm prepare INPUT --out DIR --tokenizer {model_dir}",
            )


def vocab_size_for(cfg: Config) -> int:
    """The vocabulary the run will have (as the trainer resolves it), read from metadata only."""
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    vocab = cfg.data.embedded_vocab_size
    if cfg.data.dir:
        try:
            vocab = shards.read_meta(Path(cfg.data.dir))["vocab_size"] or 50257
        except UserError:
            vocab = 50257  # not readable from here (e.g. planning for another machine): GPT-2's
    return padded_vocab_size(vocab)
