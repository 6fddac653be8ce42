"""Raw text -> token shards (the library behind `dist-lm prepare`).

Inputs are read as documents by :mod:`dist_lm.data.readers` (txt, JSONL, Parquet, Arrow, saved
datasets). Text is tokenized in parallel worker processes in pieces whose boundaries
depend only on the input, and written in input order, so the output is byte-identical whatever
the number of workers. Documents are assigned to the validation split by a seeded hash of their
index, so the split is deterministic too.
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from dist_lm.config.schema import UserError
from dist_lm.data.model_tokenizer import chat_renderer, read_model_tokenizer
from dist_lm.data.partial import FileTokens, PartialWork, arguments_of
from dist_lm.data.readers import EOT, SPECIAL_TOKENS, DataError, ReadStats, TextFile, documents, render_chat
from dist_lm.data.shards import DatasetWriter, sha256_file

PIECE_CHARS = 1 << 20  # a long document is tokenized in pieces of about 1 MB, cut at line ends
MAX_PIECE_CHARS = 2 * PIECE_CHARS  # ... and never more: at a space, or here, where a line is longer
CHUNK_CHARS = 1 << 20  # text sent to a worker at a time: small enough to keep all workers busy


def text_blocks(doc: str | TextFile) -> Iterable[str]:
    """A document's text, in the blocks it is read in (a .txt file is never read whole)."""
    return doc.blocks() if isinstance(doc, TextFile) else (doc,)


def pieces(blocks: Iterable[str]) -> Iterator[str]:
    """Cut a document's text (given in blocks of any size) into pieces of PIECE_CHARS to
    MAX_PIECE_CHARS: after the first line end past PIECE_CHARS; where a line runs on past
    MAX_PIECE_CHARS, before the last space there (where a byte-level tokenizer's words begin),
    else at MAX_PIECE_CHARS. Each cut depends on the next MAX_PIECE_CHARS characters alone, so
    the pieces do not depend on how the text was read, and the tokenizer never holds more than a
    piece."""
    held: list[str] = []  # blocks not yet cut, joined only when enough are held
    count, cut_any = 0, False
    for block in blocks:
        held.append(block)
        count += len(block)
        if count < MAX_PIECE_CHARS:
            continue
        text = "".join(held)
        while len(text) >= MAX_PIECE_CHARS:
            cut = _cut(text, complete=False)
            yield text[:cut]
            text, cut_any = text[cut:], True
        held, count = [text], len(text)
    text = "".join(held)
    while len(text) > PIECE_CHARS:
        cut = _cut(text, complete=True)
        yield text[:cut]
        text, cut_any = text[cut:], True
    if text or not cut_any:
        yield text


def _cut(text: str, complete: bool) -> int:
    """Where the next piece ends in ``text`` (which holds at least MAX_PIECE_CHARS characters, or
    is the rest of the document when ``complete``)."""
    line_end = text.find("\n", PIECE_CHARS, MAX_PIECE_CHARS)
    if line_end >= 0:
        return line_end + 1
    if complete and len(text) < MAX_PIECE_CHARS:
        return len(text)
    space = text.rfind(" ", PIECE_CHARS, MAX_PIECE_CHARS)
    return space if space > 0 else MAX_PIECE_CHARS


def is_val(doc_index: int, fraction: float, seed: int) -> bool:
    h = hashlib.blake2b(f"{seed}:{doc_index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < fraction * 2**64


def train_tokenizer(texts: Iterator[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style) with the end-of-text and chat role tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


# ----------------------------------------------------------------------------- worker processes
_worker_tokenizer = None
_worker_bounds: tuple[list[int], int] = ([], 0)  # the ids before and after each document


def _init_worker(tokenizer_json: str, bos: str | None, eos: str) -> None:
    global _worker_tokenizer, _worker_bounds
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process = one core; the pool is the parallelism
    from tokenizers import Tokenizer

    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)
    _worker_bounds = ([_worker_tokenizer.token_to_id(bos)] if bos else [], _worker_tokenizer.token_to_id(eos))


def _encode(chunk: list[Piece]) -> list[np.ndarray]:
    """Token arrays of pieces: the beginning-of-sequence id (where the tokenizer has one) before
    each document's first piece, end-of-text after its last."""
    bos, eos = _worker_bounds
    encoded = _worker_tokenizer.encode_batch([p.text for p in chunk], add_special_tokens=False)
    return [
        np.array((bos if p.first else []) + e.ids + ([eos] if p.last else []), dtype=np.uint32)
        for e, p in zip(encoded, chunk)
    ]


@dataclass(frozen=True)
class Piece:
    """A piece of a document's text, and whether it begins or ends its document."""

    text: str
    first: bool
    last: bool


@dataclass
class PrepareResult:
    out: Path
    stats: ReadStats
    tokens: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    files_already_done: int = 0
    """Input files an earlier, interrupted run of the same command had finished."""


def prepare(
    inputs: list[Path],
    out: Path,
    tokenizer_path: Path | None,
    vocab_size: int,
    workers: int,
    val_fraction: float,
    seed: int,
    text_field: str | None = None,
    skip_bad_lines: bool = False,
    shard_tokens: int = 100_000_000,
    command: str = "",
    progress: bool = True,
) -> PrepareResult:
    """Tokenize ``inputs`` into a dataset at ``out``, resuming the partial work of an interrupted
    run of the same arguments (:mod:`dist_lm.data.partial`). ``tokenizer_path``: a tokenizer.json
    (our special tokens added where it lacks them), a Hugging Face model directory (its tokenizer
    and document tokens as the model defines them: :mod:`dist_lm.data.model_tokenizer`), or None
    to train a BPE of ``vocab_size``."""
    from tokenizers import Tokenizer

    start = time.perf_counter()
    model = read_model_tokenizer(tokenizer_path) if tokenizer_path and tokenizer_path.is_dir() else None
    tokenizer_file = model.directory / "tokenizer.json" if model else tokenizer_path
    settings = {
        "tokenizer": sha256_file(tokenizer_file) if tokenizer_file and tokenizer_file.is_file() else None,
        "model_tokenizer": model is not None,
        "vocab_size": vocab_size,
        "val_fraction": val_fraction,
        "seed": seed,
        "text_field": text_field,
        "skip_bad_lines": skip_bad_lines,
        "shard_tokens": shard_tokens,
    }
    work = PartialWork(out, arguments_of(inputs, settings))

    chat = chat_renderer(model) if model else render_chat

    def read(path: Path, stats: ReadStats) -> Iterator[str | TextFile]:
        return documents(path, text_field, skip_bad_lines, stats, chat)

    try:
        tokenizer_json = work.tokenizer() or (
            model.tokenizer_json if model else _make_tokenizer(tokenizer_path, vocab_size, inputs, read)
        )
        work.keep_tokenizer(tokenizer_json)
        tokenizer = Tokenizer.from_str(tokenizer_json)
        done = [work.done(i) for i in range(len(inputs))]
        already = sum(d is not None for d in done)
        bounds = (model.bos_token, model.eos_token) if model else (None, EOT)
        _tokenize_files(work, inputs, done, read, (tokenizer_json, *bounds), workers, val_fraction, seed, progress)
        stats = ReadStats()
        for i in range(len(inputs)):
            for name, value in work.done(i).__dict__.items():
                setattr(stats, name, getattr(stats, name) + value)
        if stats.documents == 0:
            raise DataError("the inputs hold no documents")
        staged_tokenizer = work.root / "tokenizer.json"
        with DatasetWriter(out, staged_tokenizer, tokenizer.get_vocab_size(), shard_tokens) as writer:
            tokens = {"train": 0, "val": 0}
            for i in range(len(inputs)):
                for split, n in work.replay(i, writer.add).items():
                    tokens[split] += n
            tokens_meta = (
                model.meta(tokenizer.token_to_id)
                if model
                else {"eot_id": tokenizer.token_to_id(EOT), "special_tokens": SPECIAL_TOKENS}
            )
            writer.commit(
                {
                    **tokens_meta,
                    "val_fraction": val_fraction,
                    "seed": seed,
                    "documents": stats.documents,
                    "skipped_lines": stats.skipped_lines,
                    "command": command,
                }
            )
    except UserError:
        work.remove()  # bad input: nothing of this run would be reused
        raise
    work.remove()
    return PrepareResult(out, stats, tokens, time.perf_counter() - start, already)


def _make_tokenizer(path: Path | None, vocab_size: int, inputs: list[Path], read) -> str:
    """An existing tokenizer.json (with the chat role tokens added if it lacks them), or a BPE
    trained on every document of the inputs."""
    from tokenizers import Tokenizer

    if path is None:  # trained on pieces: a tokenizer trainer given a whole long document holds it whole
        texts = (piece for p in inputs for doc in read(p, ReadStats()) for piece in pieces(text_blocks(doc)))
        return train_tokenizer(texts, vocab_size).to_str()
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exceptions for unreadable files
        raise DataError(f"{path} is not a readable tokenizer.json ({e})") from None
    if tokenizer.token_to_id(EOT) is None:
        raise DataError(f"{path} has no {EOT} token; add it as a special token or train one with --vocab-size")
    tokenizer.add_special_tokens([t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None])
    return tokenizer.to_str()


def split_tail(doc: TextFile, fraction: float) -> list[tuple[Iterable[str], str]]:
    """A .txt file's head for training and its last ``fraction`` (of its bytes) held out for
    validation, as nanoGPT holds out the end of its one text file: cut at the line end at or
    after that point (at the one before it when there is none after), or, in a file without line
    ends, at that point itself. Each part as (its text blocks, split), empty parts left out."""
    if fraction <= 0 or not doc.size:
        return [(doc.blocks(), "train")]
    target = doc.size - max(1, round(fraction * doc.size))
    cut = doc.line_end_near(target)
    cut = doc.char_boundary(target) if cut is None else cut
    parts = [(doc.blocks(0, cut), "train"), (doc.blocks(cut), "val")]
    return [part for part, (start, end) in zip(parts, [(0, cut), (cut, doc.size)]) if end > start]


def with_splits(
    docs: Iterator[str | TextFile], val_fraction: float, seed: int, tail: bool, first_index: int = 0
) -> Iterator[tuple[Iterable[str], str]]:
    """(text blocks, split) pairs. By document, from a seeded hash of its index in the whole
    input (``first_index``: of the first of ``docs``); or, ``tail`` (one text file, one
    document), its last val_fraction as the validation split."""
    for index, doc in enumerate(docs, first_index):
        if tail and isinstance(doc, TextFile):
            yield from split_tail(doc, val_fraction)
        else:
            yield text_blocks(doc), "val" if is_val(index, val_fraction, seed) else "train"


def _chunks(docs: Iterator[tuple[Iterable[str], str]]) -> Iterator[tuple[list[str], list[Piece]]]:
    """Groups of pieces to tokenize, with the split of each piece; boundaries depend on content only."""
    splits: list[str] = []
    chunk: list[Piece] = []
    size = 0
    for blocks, split in docs:
        parts = pieces(blocks)
        part, first = next(parts), True  # a document has at least one piece (an empty one if it is empty)
        for following in itertools.chain(parts, [None]):  # one ahead, to know which piece is its last
            chunk.append(Piece(part, first, following is None))
            first = False
            splits.append(split)
            size += len(part)
            if size >= CHUNK_CHARS:
                yield splits, chunk
                splits, chunk, size = [], [], 0
            part = following
    if chunk:
        yield splits, chunk


def _tokenize_files(
    work: PartialWork,
    inputs: list[Path],
    done: list[ReadStats | None],
    read,
    tokenizer: tuple[str, str | None, str],
    workers: int,
    val_fraction: float,
    seed: int,
    progress: bool,
) -> None:
    """Tokenize the inputs not yet done into ``work``, each file kept as it is finished, with one
    progress bar over all of them (files, MB, tokens, MB/s, ETA). ``tokenizer``: its JSON, and
    the tokens before (or None) and after each document."""
    from tqdm import tqdm

    tail = len(inputs) == 1 and inputs[0].name.endswith(".txt")
    sizes = [input_bytes(p) for p in inputs]
    bar = tqdm(
        total=sum(sizes),
        initial=sum(s for s, d in zip(sizes, done) if d),
        disable=not progress,
        unit="B",
        unit_scale=True,
        mininterval=1.0,
        desc="tokenizing",
    )
    files_done, tokens = sum(d is not None for d in done), 0
    open_files: dict[int, FileTokens] = {}
    counted = [0] * len(inputs)  # bytes of each file shown on the bar so far

    def tasks() -> Iterator[tuple[tuple, list[Piece]]]:
        """(index, splits, last of its file, its stats once read), chunk: every input file's chunks
        in order, at least one per file, none spanning two files."""
        first_doc = 0
        for i, path in enumerate(inputs):
            if done[i] is not None:
                first_doc += done[i].documents
                continue
            stats = ReadStats()
            held = None
            for splits, chunk in _chunks(with_splits(read(path, stats), val_fraction, seed, tail, first_doc)):
                if held is not None:
                    yield (i, held[0], False, None), held[1]
                held = splits, chunk
            splits, chunk = held or ([], [])
            yield (i, splits, True, stats), chunk
            first_doc += stats.documents

    def consume(meta: tuple, arrays: list[np.ndarray], chars: int) -> None:
        nonlocal files_done, tokens
        i, splits, last, stats = meta
        out = open_files.get(i) or open_files.setdefault(i, work.start_file(i))
        for split, array in zip(splits, arrays):
            out.add(split, array)
            tokens += len(array)
        step = sizes[i] - counted[i] if last else min(chars, sizes[i] - counted[i])
        counted[i] += step
        if last:
            open_files.pop(i).finish(stats)
            files_done += 1
        bar.set_postfix_str(f"files {files_done}/{len(inputs)}, {tokens:,} tokens", refresh=False)
        bar.update(step)

    if workers <= 1:
        _init_worker(*tokenizer)
        for meta, chunk in tasks():
            consume(meta, _encode(chunk), sum(len(p.text) for p in chunk))
    else:
        # spawn, not fork: the parent may already have used the tokenizers' thread pool.
        with multiprocessing.get_context("spawn").Pool(workers, _init_worker, tokenizer) as pool:
            pending: list = []  # what each task's result belongs to, in order (imap keeps it)

            def chunks() -> Iterator[list[Piece]]:
                for meta, chunk in tasks():
                    pending.append((meta, sum(len(p.text) for p in chunk)))
                    yield chunk

            for i, arrays in enumerate(pool.imap(_encode, chunks())):
                meta, chars = pending[i]
                consume(meta, arrays, chars)
                pending[i] = None
    bar.close()


def input_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
