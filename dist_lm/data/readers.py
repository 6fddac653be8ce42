"""The formats raw text arrives in, read as documents: .txt (a file is one document, read in
blocks), JSONL (plain, .gz, .zst; a line is one document), and the tables of dist_lm.data.tables:
Parquet files, Arrow files, and datasets saved with Hugging Face ``datasets`` (``save_to_disk``; a
row is one document).
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from dist_lm.config.schema import UserError

EOT = "<|endoftext|>"
TEXT_FIELDS = ("text", "content", "message", "body", "output")
CHAT_ROLES = ("system", "user", "assistant", "tool")
SPECIAL_TOKENS = [EOT] + [f"<|{role}|>" for role in CHAT_ROLES]
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".arrow")
SAVED_DATASET = "state.json"  # what marks a directory written by datasets' save_to_disk
SAVED_DATASET_DICT = "dataset_dict.json"  # ... and one of several splits, each a directory like that
TEXT_BLOCK_CHARS = 1 << 20  # a .txt input is read this many characters at a time


class DataError(UserError):
    def __init__(self, message: str):
        super().__init__(f"data error: {message}")

    def __reduce__(self):
        # Raised in a worker pool's feeder thread, it is pickled: rebuilt from its whole text,
        # not prefixed again (which printed "data error: data error: data error: ...").
        return _rebuilt_error, (type(self), str(self))


def _rebuilt_error(cls: type, text: str) -> UserError:
    error = UserError.__new__(cls)
    UserError.__init__(error, text)
    return error


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files, directories (searched recursively) and globs -> the inputs, in a fixed order. A
    directory saved by datasets' save_to_disk is one input."""
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir() and is_saved_dataset(path):
            files.append(path)
        elif path.is_dir():
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
            raise DataError(
                f"{where}: each entry of 'messages' needs a role ({', '.join(CHAT_ROLES)}) and a string content"
            )
        parts.append(f"<|{m['role']}|>\n{m['content']}\n")
    return "".join(parts)


ChatRenderer = Callable[[list, str], str]
"""(messages, where they were read) -> the chat as text."""


@dataclass
class ReadStats:
    documents: int = 0
    skipped_lines: int = 0
    chars: int = 0


def _record_text(record: object, text_field: str | None, where: str, chat: ChatRenderer = render_chat) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a JSONL line must be an object")
    if text_field is not None:
        value = record.get(text_field)
        if not isinstance(value, str):
            raise DataError(f"{where}: no string field '{text_field}' (from --field)")
        return value
    if isinstance(record.get("messages"), list):
        return chat(record["messages"], where)
    for name in TEXT_FIELDS:
        if isinstance(record.get(name), str):
            return record[name]
    raise DataError(
        f"{where}: none of the fields {', '.join(TEXT_FIELDS)} or 'messages' is present; "
        "name the text field with --field"
    )


def documents(
    path: Path, text_field: str | None, skip_bad_lines: bool, stats: ReadStats, chat: ChatRenderer = render_chat
) -> Iterator["str | TextFile"]:
    """The documents of one input (a file, or a directory saved by datasets' save_to_disk): each a
    string, or for a .txt file a :class:`TextFile` read in blocks. ``chat`` renders a 'messages'
    list (ours: a special token per role; a model's tokenizer: its chat template)."""
    if path.is_dir() or path.name.endswith((".parquet", ".arrow")):
        from dist_lm.data.tables import table_documents  # pyarrow, only for tables (and it imports this module)

        yield from table_documents(path, text_field, stats, chat)
        return
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty; remove it from the inputs")
    if path.name.endswith(".txt"):
        if _has_text(path):
            stats.documents += 1
            yield TextFile(path, stats)
        return
    with _open_text(path) as f:
        yield from _jsonl_documents(path, f, text_field, skip_bad_lines, stats, chat)


class _ByteRange(io.RawIOBase):
    """Bytes [start, end) of an open binary file, as a file of their own."""

    def __init__(self, f: io.BufferedReader, start: int, end: int):
        f.seek(start)
        self.f, self.left = f, end - start

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.f.readinto(memoryview(buffer)[: min(len(buffer), self.left)]) or 0
        self.left -= n
        return n


class TextFile:
    """A .txt input: one document, read as text a block at a time and never whole, so that memory
    stays bounded whatever its line lengths (a 200 MB file of one line included). Ranges are in
    bytes (:meth:`blocks`), so that a part of it is read without reading what comes before."""

    def __init__(self, path: Path, stats: ReadStats):
        self.path, self.stats = path, stats
        self.size = path.stat().st_size

    def blocks(self, start: int = 0, end: int | None = None) -> Iterator[str]:
        """The text of bytes [start, end) (all of it by default), decoded as UTF-8 with universal
        newlines, in blocks of about TEXT_BLOCK_CHARS. ``start`` and ``end`` are at character
        boundaries (after a line end, or as :meth:`char_boundary` gives)."""
        end = self.size if end is None else end
        with open(self.path, "rb") as raw:
            text = io.TextIOWrapper(io.BufferedReader(_ByteRange(raw, start, end)), encoding="utf-8")
            try:
                while block := text.read(TEXT_BLOCK_CHARS):
                    self.stats.chars += len(block)
                    yield block
            except UnicodeDecodeError:  # a binary file named .txt, or another encoding
                raise DataError(
                    f"{self.path} is not UTF-8 text: byte {first_undecodable_byte(self.path):,} does "
                    "not decode; remove it from the inputs, or convert it to UTF-8"
                ) from None

    def line_end_near(self, offset: int) -> int | None:
        """The offset just after the first line end at or after ``offset`` (not the file's last
        byte), else after the last one before it; None if the file has no line end there."""
        with open(self.path, "rb") as f:
            f.seek(offset)
            position = offset
            while position < self.size - 1 and (block := f.read(min(TEXT_BLOCK_CHARS, self.size - 1 - position))):
                found = block.find(b"\n")
                if found >= 0:
                    return position + found + 1
                position += len(block)
            position = offset
            while position > 0:
                start = max(0, position - TEXT_BLOCK_CHARS)
                f.seek(start)
                found = f.read(position - start).rfind(b"\n")
                if found >= 0:
                    return start + found + 1
                position = start
        return None

    def char_boundary(self, offset: int) -> int:
        """``offset`` moved forward to the start of a UTF-8 character (past continuation bytes)."""
        with open(self.path, "rb") as f:
            f.seek(offset)
            tail = f.read(4)
        return offset + next((i for i, b in enumerate(tail) if b & 0xC0 != 0x80), len(tail))


def _has_text(path: Path) -> bool:
    """Whether a file holds anything but whitespace, read only as far as the first such byte."""
    with open(path, "rb") as f:
        while block := f.read(TEXT_BLOCK_CHARS):
            if block.strip():
                return True
    return False


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


def _jsonl_documents(
    path: Path, f: io.TextIOBase, text_field: str | None, skip_bad_lines: bool, stats: ReadStats, chat: ChatRenderer
) -> Iterator[str]:
    try:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                text = _record_text(json.loads(line), text_field, where, chat)
            except json.JSONDecodeError:
                if skip_bad_lines:
                    stats.skipped_lines += 1
                    continue
                raise DataError(
                    f"{where} is not valid JSON; fix it, or pass --skip-bad-lines to skip and count such lines"
                ) from None
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
        raise DataError(
            f"{path} is not UTF-8 text: {where} does not decode; remove it from the inputs, or convert it to UTF-8"
        ) from None


# ------------------------------------------------------------------------- Parquet and Arrow
def is_saved_dataset(path: Path) -> bool:
    return (path / SAVED_DATASET).is_file() or (path / SAVED_DATASET_DICT).is_file()
