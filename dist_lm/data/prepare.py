"""Raw text -> token shards (the library behind tools/prepare_data.py).

Inputs are .txt files (each file one document), and .jsonl / .jsonl.gz / .jsonl.zst files (each
line one document). Text is tokenized in parallel worker processes in pieces whose boundaries
depend only on the input, and written in input order, so the output is byte-identical whatever
the number of workers. Documents are assigned to the validation split by a seeded hash of their
index, so the split is deterministic too.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from dist_lm.config.schema import UserError
from dist_lm.data.shards import DatasetWriter

EOT = "<|endoftext|>"
TEXT_FIELDS = ("text", "content", "message", "body", "output")
CHAT_ROLES = ("system", "user", "assistant", "tool")
SPECIAL_TOKENS = [EOT] + [f"<|{role}|>" for role in CHAT_ROLES]
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst")
PIECE_CHARS = 1 << 20  # a long .txt file is tokenized in pieces of about 1 MB cut at line ends
CHUNK_CHARS = 1 << 20  # text sent to a worker at a time: small enough to keep all workers busy


class DataError(UserError):
    def __init__(self, message: str):
        super().__init__(f"data error: {message}")


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files, directories (searched recursively) and globs -> the input files, in a fixed order."""
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
            if not found:
                raise DataError(f"{path} holds no {', '.join(SUFFIXES)} files")
            files += found
        elif path.is_file():
            if not path.name.endswith(SUFFIXES):
                raise DataError(f"{path}: unsupported file type; inputs are {', '.join(SUFFIXES)}")
            files.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if p.endswith(SUFFIXES))
            if not matches:
                raise DataError(f"{pattern}: no such file, directory, or matching {', '.join(SUFFIXES)} files")
            files += matches
    return files


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst needs the zstandard package; pip install zstandard") from None
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    return open(path, encoding="utf-8")


def render_chat(messages: list, where: str) -> str:
    """A conversation as text, each turn opened by its role's special token."""
    parts = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each entry of 'messages' needs a role ({', '.join(CHAT_ROLES)}) "
                            "and a string content")
        parts.append(f"<|{m['role']}|>\n{m['content']}\n")
    return "".join(parts)


@dataclass
class ReadStats:
    documents: int = 0
    skipped_lines: int = 0
    chars: int = 0


def _record_text(record: object, text_field: str | None, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a JSONL line must be an object")
    if text_field is not None:
        value = record.get(text_field)
        if not isinstance(value, str):
            raise DataError(f"{where}: no string field '{text_field}' (from --field)")
        return value
    if isinstance(record.get("messages"), list):
        return render_chat(record["messages"], where)
    for name in TEXT_FIELDS:
        if isinstance(record.get(name), str):
            return record[name]
    raise DataError(f"{where}: none of the fields {', '.join(TEXT_FIELDS)} or 'messages' is present; "
                    "name the text field with --field")


def documents(path: Path, text_field: str | None, skip_bad_lines: bool, stats: ReadStats) -> Iterator[str]:
    """The documents of one input file."""
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty; remove it from the inputs")
    if path.name.endswith(".txt"):
        try:
            with _open_text(path) as f:
                text = f.read()
        except UnicodeDecodeError:  # a binary file named .txt, or another encoding
            raise DataError(f"{path} is not UTF-8 text: byte {first_undecodable_byte(path):,} does not decode; "
                            "remove it from the inputs, or convert it to UTF-8") from None
        if text.strip():
            stats.documents += 1
            stats.chars += len(text)
            yield text
        return
    with _open_text(path) as f:
        yield from _jsonl_documents(path, f, text_field, skip_bad_lines, stats)


def first_undecodable_byte(path: Path) -> int:
    """The offset in the file of the first byte that is not UTF-8 (read again, in blocks, since a
    text reader's error counts from the start of its block)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the last block
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                return offset - pending + e.start
            offset += len(block)
    return offset


def _jsonl_documents(path: Path, f: io.TextIOBase, text_field: str | None, skip_bad_lines: bool,
                     stats: ReadStats) -> Iterator[str]:
    try:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                text = _record_text(json.loads(line), text_field, where)
            except json.JSONDecodeError:
                if skip_bad_lines:
                    stats.skipped_lines += 1
                    continue
                raise DataError(f"{where} is not valid JSON; fix it, or pass --skip-bad-lines to skip and count such lines") from None
            except DataError:
                if skip_bad_lines:
                    stats.skipped_lines += 1
                    continue
                raise
            if text:
                stats.documents += 1
                stats.chars += len(text)
                yield text
    except UnicodeDecodeError:
        where = f"byte {first_undecodable_byte(path):,}" if path.name.endswith(".jsonl") else "its decompressed text"
        raise DataError(f"{path} is not UTF-8 text: {where} does not decode; remove it from the inputs, or convert "
                        "it to UTF-8") from None


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
            tokens = _tokenize_into(writer, all_documents(stats), tokenizer_json, workers, val_fraction, seed,
                                    stats, progress)
            if stats.documents == 0:
                raise DataError("the inputs hold no documents")
            writer.commit({"eot_id": tokenizer.token_to_id(EOT), "special_tokens": SPECIAL_TOKENS,
                           "val_fraction": val_fraction, "seed": seed, "documents": stats.documents,
                           "skipped_lines": stats.skipped_lines, "command": command})
    finally:
        staged_tokenizer.unlink(missing_ok=True)
    return PrepareResult(out, stats, tokens, time.perf_counter() - start)


def _chunks(docs: Iterator[str], val_fraction: float, seed: int) -> Iterator[tuple[list[str], list[tuple[str, bool]]]]:
    """Groups of pieces to tokenize, with the split of each piece; boundaries depend on content only."""
    splits: list[str] = []
    chunk: list[tuple[str, bool]] = []
    size = 0
    for index, doc in enumerate(docs):
        split = "val" if is_val(index, val_fraction, seed) else "train"
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


def _tokenize_into(writer: DatasetWriter, docs: Iterator[str], tokenizer_json: str, workers: int,
                   val_fraction: float, seed: int, stats: ReadStats, progress: bool) -> dict[str, int]:
    from tqdm import tqdm

    tokens = {"train": 0, "val": 0}
    chunks = _chunks(docs, val_fraction, seed)
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
