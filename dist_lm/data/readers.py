"""The formats raw text arrives in, read as documents: .txt (a file is one document), JSONL
(plain, .gz, .zst; a line is one document), Parquet files, Arrow files, and datasets saved with
Hugging Face ``datasets`` (``save_to_disk``; a row is one document). Parquet and Arrow are read
with pyarrow, a column at a time, so a large file never sits in memory whole.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from dist_lm.config.schema import UserError

EOT = "<|endoftext|>"
TEXT_FIELDS = ("text", "content", "message", "body", "output")
CHAT_ROLES = ("system", "user", "assistant", "tool")
SPECIAL_TOKENS = [EOT] + [f"<|{role}|>" for role in CHAT_ROLES]
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".arrow")
SAVED_DATASET = "state.json"  # what marks a directory written by datasets' save_to_disk
SAVED_DATASET_DICT = "dataset_dict.json"  # ... and one of several splits, each a directory like that
ROWS_PER_BATCH = 1024


class DataError(UserError):
    def __init__(self, message: str):
        super().__init__(f"data error: {message}")


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
    """The documents of one input (a file, or a directory saved by datasets' save_to_disk)."""
    if path.is_dir() or path.name.endswith((".parquet", ".arrow")):
        yield from _table_documents(path, text_field, stats)
        return
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




# ------------------------------------------------------------------------- Parquet and Arrow
def is_saved_dataset(path: Path) -> bool:
    return (path / SAVED_DATASET).is_file() or (path / SAVED_DATASET_DICT).is_file()


def _saved_dataset_files(path: Path) -> list[Path]:
    """The Arrow files of a dataset saved with save_to_disk; of a DatasetDict, its train split's."""
    if (path / SAVED_DATASET_DICT).is_file():
        splits = json.loads((path / SAVED_DATASET_DICT).read_text()).get("splits", [])
        if "train" not in splits:
            raise DataError(f"{path} is a saved DatasetDict with splits {splits} and no 'train'; give the "
                            "directory of the split to read (e.g. {path / splits[0]})" if splits else
                            f"{path} is a saved DatasetDict without splits")
        path = path / "train"
    try:
        state = json.loads((path / SAVED_DATASET).read_text())
        return [path / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path / SAVED_DATASET} is not the state of a saved dataset ({e}); save it again "
                        "with datasets' save_to_disk") from None


def _text_column(schema, path: Path, text_field: str | None) -> str:
    """The column holding the text: --field, else the first of TEXT_FIELDS, else messages."""
    names = schema.names
    if text_field is not None:
        if text_field not in names:
            raise DataError(f"{path}: no column '{text_field}' (from --field); its columns are {names}")
        return text_field
    for name in (*TEXT_FIELDS, "messages"):
        if name in names:
            return name
    raise DataError(f"{path}: none of the columns {', '.join(TEXT_FIELDS)} or 'messages' is present (its "
                    f"columns are {names}); name the text column with --field")


def _arrow_batches(path: Path):
    """(schema, record batches) of an Arrow file: the IPC stream format, which save_to_disk writes,
    or the IPC file format."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
        return reader.schema, iter(reader)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))


def _table_batches(path: Path, text_field: str | None) -> Iterator[tuple[str, list]]:
    """(column name, values) in batches of rows, from a Parquet or an Arrow file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.name.endswith(".parquet"):
            f = pq.ParquetFile(path)
            column = _text_column(f.schema_arrow, path, text_field)
            for batch in f.iter_batches(batch_size=ROWS_PER_BATCH, columns=[column]):
                yield column, batch.column(0).to_pylist()
        else:
            schema, batches = _arrow_batches(path)
            column = _text_column(schema, path, text_field)
            for batch in batches:
                yield column, batch.column(schema.get_field_index(column)).to_pylist()
    except (pa.ArrowException, OSError) as e:
        kind = "Parquet" if path.name.endswith(".parquet") else "Arrow"
        raise DataError(f"{path} is not a readable {kind} file ({str(e).splitlines()[0]}); remove it from the "
                        "inputs, or write it again") from None


def _table_documents(path: Path, text_field: str | None, stats: ReadStats) -> Iterator[str]:
    files = _saved_dataset_files(path) if path.is_dir() else [path]
    for f in files:
        row = 0
        for column, values in _table_batches(f, text_field):
            for value in values:
                row += 1
                where = f"{f} row {row}"
                if column == "messages":
                    text = render_chat(value, where) if isinstance(value, list) else None
                else:
                    text = value
                if text is None:
                    continue  # a null cell: no document
                if not isinstance(text, str):
                    raise DataError(f"{where}: column '{column}' holds {type(text).__name__}, not text; "
                                    "name the text column with --field")
                if text:
                    stats.documents += 1
                    stats.chars += len(text)
                    yield text
