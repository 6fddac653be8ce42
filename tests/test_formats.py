"""The formats corpora ship in (Parquet, Arrow, datasets saved with save_to_disk) read into the
same token shards as the same documents in JSONL; a corrupt file named in one line; one .txt
file's validation split; a warning when a dataset has no validation data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from test_prepare import dataset_files, run_tool, text
from tokenizers import Tokenizer

from conftest import assert_ok

DOCS = [text(i, 200 + 10 * i) for i in range(40)]


def as_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs))
    return path


def prepared(inputs, out: Path, *extra) -> dict[str, bytes]:
    assert_ok(run_tool(*inputs, "--out", out, "--vocab-size", 400, "--val-fraction", 0.1, *extra))
    return dataset_files(out)


def test_parquet_gives_the_shards_of_the_same_jsonl_for_any_worker_count(tmp_path):
    reference = prepared([as_jsonl(tmp_path / "docs.jsonl", DOCS)], tmp_path / "from-jsonl")
    # Two files, the text in a column found by name among others, row groups smaller than a batch.
    pq.write_table(pa.table({"id": list(range(25)), "content": DOCS[:25]}), tmp_path / "a.parquet", row_group_size=7)
    pq.write_table(pa.table({"content": DOCS[25:], "url": ["u"] * 15}), tmp_path / "b.parquet")
    for workers in (1, 2):
        assert (
            prepared(
                [tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path / f"parquet-{workers}", "--workers", workers
            )
            == reference
        )


def test_a_named_parquet_column_and_chat_rows(tmp_path):
    chats = [
        [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": DOCS[i]}] for i in range(5)
    ]
    pq.write_table(pa.table({"text": ["not this"] * 5, "body": DOCS[:5]}), tmp_path / "field.parquet")
    pq.write_table(pa.table({"messages": chats}), tmp_path / "chat.parquet")
    assert prepared([tmp_path / "field.parquet"], tmp_path / "a", "--field", "body") == prepared(
        [as_jsonl(tmp_path / "body.jsonl", DOCS[:5])], tmp_path / "b"
    )
    as_jsonl(tmp_path / "chat.jsonl", chats, field="messages")
    assert prepared([tmp_path / "chat.parquet"], tmp_path / "c") == prepared([tmp_path / "chat.jsonl"], tmp_path / "d")


def test_datasets_saved_to_disk_and_arrow_files(tmp_path):
    import datasets

    reference = prepared([as_jsonl(tmp_path / "docs.jsonl", DOCS)], tmp_path / "from-jsonl")
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(saved))
    assert prepared([saved], tmp_path / "from-saved") == reference
    arrow = sorted(saved.glob("*.arrow"))
    assert prepared(arrow, tmp_path / "from-arrow") == reference
    # A DatasetDict: its train split, and the others left alone.
    splits = tmp_path / "splits"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": DOCS}),
            "test": datasets.Dataset.from_dict({"text": ["held out"] * 3}),
        }
    ).save_to_disk(str(splits))
    assert prepared([splits], tmp_path / "from-dict") == reference


def test_a_corrupt_parquet_file_is_named_in_one_line(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": DOCS}), good)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # cut short, as an interrupted download
    out = tmp_path / "out"
    proc = run_tool(good, bad, "--out", out, "--vocab-size", 400)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"{bad} is not a readable Parquet file" in lines[0]
    assert not out.exists()


def test_one_text_file_holds_out_its_end_as_validation(tmp_path):
    lines = [text(i, 40) for i in range(200)]
    source = tmp_path / "book.txt"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    proc = run_tool(source, "--out", out, "--vocab-size", 400, "--val-fraction", 0.1)
    assert_ok(proc)
    assert "no validation data" not in proc.stderr
    meta = json.loads((out / "meta.json").read_text())
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))

    def read(split: str) -> str:
        ids = np.concatenate([np.fromfile(out / s["file"], dtype=meta["dtype"]) for s in meta["splits"][split]])
        return tokenizer.decode([int(i) for i in ids if i != meta["eot_id"]])

    train, val = read("train"), read("val")
    assert train + val == source.read_text()  # the whole text, cut once
    assert train.endswith("\n") and 0.08 < len(val) / len(source.read_text()) < 0.12


def test_a_dataset_without_validation_data_is_warned_about(tmp_path):
    proc = run_tool(
        as_jsonl(tmp_path / "few.jsonl", DOCS[:3]), "--out", tmp_path / "out", "--vocab-size", 400, "--val-fraction", 0
    )
    assert_ok(proc)
    assert "has no validation data" in proc.stderr


def test_an_interrupted_prepare_started_again_skips_the_files_done_and_gives_the_same_bytes(tmp_path, cache_dir):
    import subprocess
    import sys
    import time

    from test_prepare import TOOL

    src = tmp_path / "many"
    src.mkdir()
    for i in range(30):
        as_jsonl(src / f"{i:02d}.jsonl", [text(1000 * i + j, 1000) for j in range(15)])
    tokenizer = next(cache_dir.glob("embedded-*/tokenizer.json"))
    args = ["--tokenizer", tokenizer, "--val-fraction", 0.1, "--workers", 1]
    assert_ok(run_tool(src, "--out", tmp_path / "whole", *args))
    reference = dataset_files(tmp_path / "whole")

    out = tmp_path / "out"
    finished = tmp_path / ".out.partial" / "files"
    proc = subprocess.Popen(
        [sys.executable, str(TOOL), str(src), "--out", str(out), *map(str, args), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if finished.is_dir() and len([d for d in finished.iterdir() if not d.name.endswith(".tmp")]) >= 3:
            proc.kill()
            break
        time.sleep(0.01)
    assert proc.wait() != 0, "the run finished before it could be interrupted"
    assert not out.exists()  # never half a dataset

    again = run_tool(src, "--out", out, *args)
    assert_ok(again)
    assert "of the input files were done by an interrupted run" in again.stdout
    assert dataset_files(out) == reference
    assert not (tmp_path / ".out.partial").exists()
