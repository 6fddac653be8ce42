"""Parquet files, Arrow files and datasets saved with Hugging Face ``datasets`` (``save_to_disk``)
read as documents: a row is one document, its text column found by name (or --field), a chat's
``messages`` rendered as text. Read with pyarrow a column at a time, in batches of rows, so a
large file never sits in memory whole. (The other formats, and the dispatch: dist_lm.data.readers.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from dist_lm.data.readers import SAVED_DATASET, SAVED_DATASET_DICT, TEXT_FIELDS, ChatRenderer, DataError, ReadStats

ROWS_PER_BATCH = 1024


def _saved_dataset_files(path: Path) -> list[Path]:
    """The Arrow files of a dataset saved with save_to_disk; of a DatasetDict, its train split's."""
    if (path / SAVED_DATASET_DICT).is_file():
        splits = json.loads((path / SAVED_DATASET_DICT).read_text()).get("splits", [])
        if "train" not in splits:
            raise DataError(
                f"{path} is a saved DatasetDict with splits {splits} and no 'train'; give the "
                "directory of the split to read (e.g. {path / splits[0]})"
                if splits
                else f"{path} is a saved DatasetDict without splits"
            )
        path = path / "train"
    try:
        state = json.loads((path / SAVED_DATASET).read_text())
        return [path / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"{path / SAVED_DATASET} is not the state of a saved dataset ({e}); save it again "
            "with datasets' save_to_disk"
        ) from None


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
    raise DataError(
        f"{path}: none of the columns {', '.join(TEXT_FIELDS)} or 'messages' is present (its "
        f"columns are {names}); name the text column with --field"
    )


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
        raise DataError(
            f"{path} is not a readable {kind} file ({str(e).splitlines()[0]}); remove it from the "
            "inputs, or write it again"
        ) from None


def table_documents(path: Path, text_field: str | None, stats: ReadStats, chat: ChatRenderer) -> Iterator[str]:
    files = _saved_dataset_files(path) if path.is_dir() else [path]
    for f in files:
        row = 0
        for column, values in _table_batches(f, text_field):
            for value in values:
                row += 1
                where = f"{f} row {row}"
                if column == "messages":
                    text = chat(value, where) if isinstance(value, list) else None
                else:
                    text = value
                if text is None:
                    continue  # a null cell: no document
                if not isinstance(text, str):
                    raise DataError(
                        f"{where}: column '{column}' holds {type(text).__name__}, not text; "
                        "name the text column with --field"
                    )
                if text:
                    stats.documents += 1
                    stats.chars += len(text)
                    yield text
