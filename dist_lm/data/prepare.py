"""Raw text -> token shards (the library behind `dist-lm prepare`).

Inputs are read as documents by :mod:`dist_lm.data.readers` (txt, JSONL, Parquet, Arrow, saved
datasets). Text is tokenized in parallel worker processes in pieces whose boundaries
depend only on the input, and written in input order, so the output is byte-identical whatever
the number of workers. Documents are assigned to the validation split by a seeded hash of their
index, so the split is deterministic too.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from dist_lm.data.readers import EOT, SPECIAL_TOKENS, DataError, ReadStats, documents
from dist_lm.data.shards import DatasetWriter

PIECE_CHARS = 1 << 20  # a long .txt file is tokenized in pieces of about 1 MB cut at line ends
CHUNK_CHARS = 1 << 20  # text sent to a worker at a time: small enough to keep all workers busy


def pieces(doc: str) -> list[str]:
    """Cut a long document at line ends into pieces of about PIECE_CHARS (content-determined)."""
    out, start = [], 0
    while len(doc) - start > PIECE_CHARS:
        cut = doc.find("\n", start + PIECE_CHARS)
        if cut < 0:
            break
        out.append(doc[start:cut + 1])
        start = cut + 1
    out.append(doc[start:])
    return out


def is_val(doc_index: int, fraction: float, seed: int) -> bool:
    h = hashlib.blake2b(f"{seed}:{doc_index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < fraction * 2**64


def train_tokenizer(texts: Iterator[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style) with the end-of-text and chat role tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


# ----------------------------------------------------------------------------- worker processes
_worker_tokenizer = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process = one core; the pool is the parallelism
    from tokenizers import Tokenizer

    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)


def _encode(chunk: list[tuple[str, bool]]) -> list[np.ndarray]:
    """Token arrays of (piece, ends its document) pairs; end-of-text after each document's last piece."""
    eot = _worker_tokenizer.token_to_id(EOT)
    encoded = _worker_tokenizer.encode_batch([text for text, _ in chunk], add_special_tokens=False)
    return [np.array(e.ids + ([eot] if ends else []), dtype=np.uint32) for e, (_, ends) in zip(encoded, chunk)]


@dataclass
class PrepareResult:
    out: Path
    stats: ReadStats
    tokens: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def prepare(inputs: list[Path], out: Path, tokenizer_path: Path | None, vocab_size: int, workers: int,
            val_fraction: float, seed: int, text_field: str | None = None, skip_bad_lines: bool = False,
            shard_tokens: int = 100_000_000, command: str = "", progress: bool = True) -> PrepareResult:
    from tokenizers import Tokenizer

    start = time.perf_counter()
    stats = ReadStats()

    def all_documents(s: ReadStats) -> Iterator[str]:
        for path in inputs:
            yield from documents(path, text_field, skip_bad_lines, s)

    if tokenizer_path is not None:
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as e:  # tokenizers raises plain Exceptions for unreadable files
            raise DataError(f"{tokenizer_path} is not a readable tokenizer.json ({e})") from None
        if tokenizer.token_to_id(EOT) is None:
            raise DataError(f"{tokenizer_path} has no {EOT} token; add it as a special token or train one "
                            "with --vocab-size")
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        tokenizer.add_special_tokens(missing)  # chat role tokens, only if the tokenizer lacks them
    else:
        tokenizer = train_tokenizer(all_documents(ReadStats()), vocab_size)
    vocab = tokenizer.get_vocab_size()
    tokenizer_json = tokenizer.to_str()

    out.parent.mkdir(parents=True, exist_ok=True)
    staged_tokenizer = out.parent / f".{out.name}.tokenizer-{os.getpid()}.json"
    staged_tokenizer.write_text(tokenizer_json)
    try:
        with DatasetWriter(out, staged_tokenizer, vocab, shard_tokens) as writer:
            one_text_file = len(inputs) == 1 and inputs[0].name.endswith(".txt")
            docs = with_splits(all_documents(stats), val_fraction, seed, tail=one_text_file)
            tokens = _tokenize_into(writer, docs, tokenizer_json, workers, stats, progress)
            if stats.documents == 0:
                raise DataError("the inputs hold no documents")
            writer.commit({"eot_id": tokenizer.token_to_id(EOT), "special_tokens": SPECIAL_TOKENS,
                           "val_fraction": val_fraction, "seed": seed, "documents": stats.documents,
                           "skipped_lines": stats.skipped_lines, "command": command})
    finally:
        staged_tokenizer.unlink(missing_ok=True)
    return PrepareResult(out, stats, tokens, time.perf_counter() - start)


def split_tail(doc: str, fraction: float) -> tuple[str, str]:
    """(head, tail): the last ``fraction`` of ``doc`` held out, cut at the line end at or after
    that point (at the one before it when there is none after), as nanoGPT holds out the end of
    its one text file."""
    if fraction <= 0 or not doc:
        return doc, ""
    cut = len(doc) - max(1, round(fraction * len(doc)))
    after = doc.find("\n", cut)
    cut = after + 1 if 0 <= after < len(doc) - 1 else doc.rfind("\n", 0, cut) + 1
    return doc[:cut], doc[cut:]


def with_splits(docs: Iterator[str], val_fraction: float, seed: int, tail: bool) -> Iterator[tuple[str, str]]:
    """(text, split) pairs. By document, from a seeded hash of its index; or, ``tail`` (one text
    file, one document), its last val_fraction as the validation split."""
    for index, doc in enumerate(docs):
        if tail:
            for text, split in zip(split_tail(doc, val_fraction), ("train", "val")):
                if text:
                    yield text, split
        else:
            yield doc, "val" if is_val(index, val_fraction, seed) else "train"


def _chunks(docs: Iterator[tuple[str, str]]) -> Iterator[tuple[list[str], list[tuple[str, bool]]]]:
    """Groups of pieces to tokenize, with the split of each piece; boundaries depend on content only."""
    splits: list[str] = []
    chunk: list[tuple[str, bool]] = []
    size = 0
    for doc, split in docs:
        parts = pieces(doc)
        for i, part in enumerate(parts):
            chunk.append((part, i == len(parts) - 1))
            splits.append(split)
            size += len(part)
            if size >= CHUNK_CHARS:
                yield splits, chunk
                splits, chunk, size = [], [], 0
    if chunk:
        yield splits, chunk


def _tokenize_into(writer: DatasetWriter, docs: Iterator[tuple[str, str]], tokenizer_json: str, workers: int,
                   stats: ReadStats, progress: bool) -> dict[str, int]:
    from tqdm import tqdm

    tokens = {"train": 0, "val": 0}
    chunks = _chunks(docs)
    bar = tqdm(disable=not progress, unit=" docs", mininterval=1.0, desc="tokenizing")
    start = time.perf_counter()

    def consume(splits: list[str], arrays: list[np.ndarray]) -> None:
        for split, array in zip(splits, arrays):
            writer.add(split, array)
            tokens[split] += len(array)
        bar.n = stats.documents
        mb_per_s = stats.chars / 1e6 / max(1e-9, time.perf_counter() - start)
        bar.set_postfix_str(f"{sum(tokens.values()):,} tokens, {mb_per_s:.1f} MB/s", refresh=False)
        bar.refresh()

    if workers <= 1:
        _init_worker(tokenizer_json)
        for splits, chunk in chunks:
            consume(splits, _encode(chunk))
    else:
        # spawn, not fork: the parent may already have used the tokenizers' thread pool.
        with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer_json,)) as pool:
            order: list[list[str]] = []

            def tasks() -> Iterator[list[tuple[str, bool]]]:
                for splits, chunk in chunks:
                    order.append(splits)
                    yield chunk

            for i, arrays in enumerate(pool.imap(_encode, tasks())):  # imap keeps input order
                consume(order[i], arrays)
                order[i] = []
    bar.close()
    return tokens
