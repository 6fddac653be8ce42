"""tools/prepare_data.py, run as a user runs it, and the loader's checks of what it reads."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard
from tokenizers import Tokenizer

from conftest import ROOT, assert_ok, launch, read_metrics, start_training
from dist_lm.data import shards
from dist_lm.data.readers import SPECIAL_TOKENS
from dist_lm.observe.sinks import read_sample_log
from dist_lm.store import checkpoints

TOOL = ROOT / "tools" / "prepare_data.py"
WORDS = "the of a model data token train rank shard window sample batch loss step".split()


def run_tool(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args), "--quiet"], capture_output=True, text=True, timeout=300, env=env
    )


def text(seed: int, words: int = 300) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), words))


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    """A little of everything: txt, jsonl with several text fields, chat records, gz and zst."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(text(0, 3000))
    with open(src / "b.jsonl", "w") as f:
        for i, name in enumerate(["text", "content", "message", "body", "output"] * 20):
            f.write(json.dumps({"id": i, name: text(i + 1)}) + "\n")
        f.write(
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "be brief"},
                        {"role": "user", "content": "hello"},
                        {"role": "assistant", "content": "hi there"},
                    ]
                }
            )
            + "\n"
        )
    with gzip.open(src / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": text(100 + i)}) + "\n" for i in range(30))
    with open(src / "d.jsonl.zst", "wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as f:
        f.write("".join(json.dumps({"text": text(200 + i)}) + "\n" for i in range(30)).encode())
    return src


def dataset_files(out: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".bin" or p.name == "tokenizer.json"}
    meta = json.loads((out / "meta.json").read_text())
    meta.pop("command")
    files["meta"] = json.dumps(meta).encode()
    return files


def test_one_and_two_workers_give_byte_identical_output(corpus_dir, tmp_path):
    for w in (1, 2):
        assert_ok(
            run_tool(
                corpus_dir,
                "--out",
                tmp_path / f"w{w}",
                "--vocab-size",
                400,
                "--workers",
                w,
                "--val-fraction",
                0.1,
                "--shard-tokens",
                20_000,
            )
        )
    one, two = dataset_files(tmp_path / "w1"), dataset_files(tmp_path / "w2")
    assert one == two
    assert sum(1 for name in one if name.startswith("train_")) > 1  # several shards were cut


def test_output_format_and_contents(corpus_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_tool(corpus_dir, "--out", out, "--vocab-size", 400, "--val-fraction", 0.2, "--seed", 3)
    assert_ok(proc)
    meta = shards.read_meta(out)
    assert meta["dtype"] == "uint16" and meta["documents"] == 1 + 101 + 60 and meta["seed"] == 3
    assert meta["val_fraction"] == 0.2 and meta["command"].startswith("dist-lm prepare ")
    assert meta["tokenizer_sha256"] == shards.sha256_file(out / "tokenizer.json")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    train = np.concatenate(shards.open_split(out, meta, "train"))
    val = np.concatenate(shards.open_split(out, meta, "val"))
    eot = tok.token_to_id("<|endoftext|>")
    assert meta["eot_id"] == eot and (train == eot).sum() + (val == eot).sum() == meta["documents"]
    assert 0.1 < (val == eot).sum() / meta["documents"] < 0.3
    for shard in meta["splits"]["train"]:
        assert shards.sha256_file(out / shard["file"]) == shard["sha256"]
    # the chat record: each role opens with its own special token
    everything = np.concatenate([train, val])
    for role in ("<|system|>", "<|user|>", "<|assistant|>"):
        assert (everything == tok.token_to_id(role)).sum() == 1
    assert "hi there" in tok.decode(everything.tolist(), skip_special_tokens=False)


def test_the_split_follows_the_seed(corpus_dir, tmp_path):
    sizes = []
    for seed in (0, 0, 1):
        out = tmp_path / f"s{len(sizes)}"
        assert_ok(run_tool(corpus_dir, "--out", out, "--vocab-size", 400, "--val-fraction", 0.3, "--seed", seed))
        sizes.append(shards.read_meta(out)["splits"]["val"][0]["sha256"])
    assert sizes[0] == sizes[1] != sizes[2]


def test_an_existing_tokenizer_is_used_as_is(corpus_dir, tmp_path, cache_dir):
    tok = next(cache_dir.glob("embedded-*")) / "tokenizer.json"
    out = tmp_path / "out"
    assert_ok(run_tool(corpus_dir, "--out", out, "--tokenizer", tok))
    assert shards.read_meta(out)["tokenizer_sha256"] == shards.sha256_file(tok)
    assert all(Tokenizer.from_file(str(out / "tokenizer.json")).token_to_id(t) is not None for t in SPECIAL_TOKENS)


def put(path: Path, content: str) -> Path:
    path.write_text(content)
    return path


def write_bytes(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda d: d / "missing.jsonl", "missing.jsonl: no such file"),
        (lambda d: put(d / "x.csv", "a"), "unsupported file type"),
        (lambda d: put(d / "e.txt", ""), "e.txt is empty; remove it"),
        (
            lambda d: put(d / "j.jsonl", '{"text": "ok"}\n{"text": oops}\n'),
            "j.jsonl line 2 is not valid JSON; fix it, or pass --skip-bad-lines",
        ),
        (
            lambda d: put(d / "f.jsonl", '{"title": "no text"}\n'),
            "f.jsonl line 1: none of the fields text, content, message, body, output or 'messages'",
        ),
        (
            lambda d: put(d / "m.jsonl", '{"messages": [{"role": "robot", "content": "x"}]}\n'),
            "m.jsonl line 1: each entry of 'messages' needs a role",
        ),
        (
            lambda d: write_bytes(d / "b.txt", b"a text, then binary \x89PNG\xff\x00"),
            "b.txt is not UTF-8 text: byte 20 does not",
        ),
        (
            lambda d: write_bytes(d / "b.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n'),
            "b.jsonl is not UTF-8 text: byte 25 does not",
        ),
    ],
)
def test_bad_inputs_get_one_line_and_leave_nothing(tmp_path, make, fragment):
    out = tmp_path / "out"
    proc = run_tool(make(tmp_path), "--out", out, "--vocab-size", 300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_skip_bad_lines_counts_them(tmp_path):
    src = tmp_path / "j.jsonl"
    src.write_text("".join(json.dumps({"text": text(i)}) + "\n" for i in range(5)) + "{broken\n" + '{"x": 1}\n')
    proc = run_tool(src, "--out", tmp_path / "out", "--vocab-size", 300, "--skip-bad-lines")
    assert_ok(proc)
    assert "2 bad lines skipped" in proc.stdout and shards.read_meta(tmp_path / "out")["skipped_lines"] == 2


def test_an_existing_output_is_kept_unless_overwrite(corpus_dir, tmp_path):
    out = tmp_path / "out"
    assert_ok(run_tool(corpus_dir, "--out", out, "--vocab-size", 300))
    first = (out / "meta.json").read_text()
    proc = run_tool(corpus_dir, "--out", out, "--vocab-size", 320)
    assert proc.returncode == 2 and "pass --overwrite" in proc.stderr and (out / "meta.json").read_text() == first
    assert_ok(run_tool(corpus_dir, "--out", out, "--vocab-size", 320, "--overwrite"))
    assert shards.read_meta(out)["vocab_size"] > 300 and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_overwrite_never_removes_what_prepare_did_not_write(corpus_dir, tmp_path):
    """--out DIR --overwrite with DIR the input deleted every input file (exit 0); with --out the
    input's parent, also an unrelated file there. --overwrite replaces only a dataset prepare made."""
    unrelated = tmp_path / "notes.txt.bak"
    unrelated.write_text("mine")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for out in (corpus_dir, tmp_path):  # the input directory itself, and its parent
        proc = run_tool(corpus_dir, "--out", out, "--vocab-size", 300, "--overwrite")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and f"--out {out} holds the input" in lines[0], proc.stderr
    not_a_dataset = tmp_path / "project"
    not_a_dataset.mkdir()
    (not_a_dataset / "keep").write_text("x")
    proc = run_tool(corpus_dir, "--out", not_a_dataset, "--vocab-size", 300, "--overwrite")
    assert proc.returncode == 2 and "holds keep, which prepare does not write" in proc.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == {**before, not_a_dataset / "keep": b"x"}


def test_a_single_line_text_file_is_split_and_tokenized_in_bounded_pieces(tmp_path):
    """A .txt file without a line end went wholly to validation ("0 train and 10,992,028 validation
    tokens") and reached the tokenizer as one string (a 20 MB line peaked at 3.4 GB, a 200 MB one
    grew past 18 GB). It is held out by bytes now, and read and tokenized in pieces of at most
    MAX_PIECE_CHARS (peak memory: docs/reliability.md)."""
    from dist_lm.data.prepare import MAX_PIECE_CHARS, pieces

    line = text(5, 700_000)  # about 4 MB, no line end
    (tmp_path / "one.txt").write_text(line)
    proc = run_tool(
        tmp_path / "one.txt", "--out", tmp_path / "out", "--vocab-size", 300, "--val-fraction", 0.1, "--workers", 2
    )
    assert_ok(proc)
    meta = shards.read_meta(tmp_path / "out")
    train, val = (sum(s["tokens"] for s in meta["splits"][split]) for split in ("train", "val"))
    assert 0.08 < val / (train + val) < 0.12, (train, val)
    cut = list(pieces([line[i : i + 100_000] for i in range(0, len(line), 100_000)]))
    assert "".join(cut) == line and max(map(len, cut)) <= MAX_PIECE_CHARS and cut == list(pieces([line]))


# ------------------------------------------------------------------- the loader reading it
@pytest.fixture
def prepared(corpus_dir, tmp_path) -> Path:
    out = tmp_path / "data"
    assert_ok(run_tool(corpus_dir, "--out", out, "--vocab-size", 400, "--val-fraction", 0.2))
    return out


def train_args(data: Path, run: Path, *extra) -> list[str]:
    return [
        "--config",
        "debug",
        f"data.dir={data}",
        f"run.dir={run}",
        "train.max_steps=4",
        "train.log_interval=1",
        "train.eval_interval=2",
        "model.seq_len=32",
        *extra,
    ]


def bad_run(env, args) -> str:
    proc = launch("python", args, env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_training_runs_on_prepared_data(env, ds_ops, prepared, tmp_path):
    proc = launch("python", train_args(prepared, tmp_path / "run", "train.sample_tokens=5"), env)
    assert_ok(proc)
    train, evals = read_metrics(tmp_path / "run")
    assert len(train) == 4 and len(evals) == 2 and "sample at step 4: The" in proc.stdout


def test_two_ranks_read_disjoint_data_that_adds_up_to_one_process(env, ds_ops, prepared, tmp_path):
    """What each rank of a real two-process run trained on (data.log_samples), against the order
    one process reads."""
    run = tmp_path / "run"
    assert_ok(
        launch(
            "torchrun",
            train_args(prepared, run, "data.log_samples=true", "train.global_batch_size=8", "train.micro_batch_size=2"),
            env,
        )
    )
    ranks = [read_sample_log(run / "samples" / f"rank{r}.txt") for r in (0, 1)]
    import torch

    from dist_lm.config.batch import BatchSizes
    from dist_lm.data.sampler import TrainData

    one = TrainData(
        prepared, shards.read_meta(prepared), 32, BatchSizes(8, 1, 1), 0, seed=1337, device=torch.device("cpu")
    )
    assert list(ranks[0]) == list(ranks[1]) == [1, 2, 3, 4]
    for step in range(4):
        r0, r1 = ranks[0][step + 1], ranks[1][step + 1]
        assert len(r0) == len(r1) == 4 and not set(r0) & set(r1)
        assert r0 + r1 == one.rank_ids(step * 8).tolist()
    one.close()


def test_nanogpt_layout_needs_its_dtype(env, ds_ops, tmp_path):
    data = tmp_path / "nano"
    data.mkdir()
    rng = np.random.default_rng(0)
    rng.integers(0, 300, 20_001, dtype=np.uint16).tofile(data / "train.bin")  # 40,002 bytes: not whole uint32s
    rng.integers(0, 300, 2_000, dtype=np.uint16).tofile(data / "val.bin")
    run = tmp_path / "run"
    assert "set data.dtype=uint16" in bad_run(env, train_args(data, run, "model.vocab_size=320"))
    assert "model.vocab_size: " in bad_run(env, train_args(data, run, "data.dtype=uint16"))
    assert "not a whole number of uint32 tokens" in bad_run(
        env, train_args(data, run, "data.dtype=uint32", "model.vocab_size=320")
    )
    assert "holds token id 299, but model.vocab_size is 200" in bad_run(
        env, train_args(data, run, "data.dtype=uint16", "model.vocab_size=200")
    )
    proc = launch("python", train_args(data, run, "data.dtype=uint16", "model.vocab_size=320"), env)
    assert_ok(proc)
    assert len(read_metrics(run)[0]) == 4

    # The run never had a tokenizer: generate and export say so, and take one.
    def tool(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dist_lm", *args], capture_output=True, text=True, env=env)

    refused = tool("generate", str(run), "--max-tokens", "3")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "was trained on data without a tokenizer" in refused.stderr and "--tokenizer PATH" in refused.stderr
    from dist_lm.config.schema import UserError
    from dist_lm.use.export import export_hf

    with pytest.raises(UserError, match="export error: .* was trained on data without a tokenizer"):
        export_hf(run, tmp_path / "hf")
    from tokenizers import models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"])
    tokenizer.train_from_iterator([" ".join(WORDS)] * 20, trainer=trainer)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert_ok(tool("generate", str(run), "--max-tokens", "3", "--tokenizer", str(tmp_path)))
    export_hf(run, tmp_path / "hf", tokenizer=tmp_path / "tokenizer.json")
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(dtype="float16"), "dtype is 'float16'; token shards are uint16 or uint32"),
        (lambda m: m.update(vocab_size=-5), "vocab_size is -5, not a positive integer"),
        (lambda m: m.update(vocab_size="400"), "vocab_size is '400', not a positive integer"),
        (
            lambda m: m["splits"]["train"][0].update(file="../other/train_0001.bin"),
            "splits.train[0].file must be a file name in the dataset directory",
        ),
        (lambda m: m["splits"]["train"][0].update(tokens=True), "splits.train[0].tokens is True, not a count"),
        (lambda m: m["splits"].update(train="train_0000.bin"), "splits.train is not a list of shards"),
        (lambda m: m.pop("splits"), "splits must map train (and val) to lists of shards"),
        (lambda m: m.update(eot_id=10**9), "eot_id is 1000000000, not a token id below vocab_size"),
        (lambda m: m.update(tokenizer="/etc/passwd"), "tokenizer is '/etc/passwd', not a file name"),
    ],
)
def test_a_malformed_meta_json_is_refused_in_one_line(env, prepared, tmp_path, change, message):
    """meta.json is read through one schema (dist_lm.data.shards.meta_problem): "dtype": "float16"
    trained on zeros with exit 0, several fields ended in KeyError/TypeError tracebacks, and a
    shard named ../other/... was read from outside the data directory. Refused before torch."""
    meta = json.loads((prepared / "meta.json").read_text())
    change(meta)
    (prepared / "meta.json").write_text(json.dumps(meta))
    line = bad_run(env, train_args(prepared, tmp_path / "run"))
    assert f"{prepared / 'meta.json'}: {message}" in line and not (tmp_path / "run").exists()


def test_a_shard_rewritten_in_place_is_refused_at_the_start_and_during_a_run(env, ds_ops, prepared, tmp_path):
    """Same size, other tokens: trained on without a word before. At the start the content is
    checked against meta.json's hashes (data.verify); during a run, every checkpoint first checks
    that no shard changed on disk, and stops without saving if one did."""
    run = tmp_path / "run"
    meta = json.loads((prepared / "meta.json").read_text())
    shard = prepared / meta["splits"]["train"][0]["file"]
    original = shard.read_bytes()
    tokens = np.frombuffer(original, dtype=np.uint16).copy()
    tokens[len(tokens) // 2] = (tokens[len(tokens) // 2] + 1) % 300
    shard.write_bytes(tokens.tobytes())
    for verify in ("auto", "full"):
        line = bad_run(env, train_args(prepared, run, f"data.verify={verify}"))
        assert f"shard {shard} does not hold what meta.json recorded" in line
    assert not run.exists()
    assert_ok(launch("python", train_args(prepared, run, "data.verify=none", "train.max_steps=2"), env))
    shard.write_bytes(original)

    # during a run: a checkpoint every 2 steps; the shard changes after the first
    args = train_args(
        prepared, tmp_path / "during", "train.max_steps=400", "checkpoint.interval=2", "train.eval_interval=0"
    )
    proc = start_training(args, env)
    step2 = tmp_path / "during" / "checkpoints" / "step00000002" / "state.json"
    deadline = time.monotonic() + 240
    while not step2.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    # Overwritten in place, its size kept throughout: write_bytes truncates first, and a run that
    # reads its memory map in that instant dies of SIGBUS (docs/reliability.md).
    with shard.open("r+b") as f:
        f.write(tokens.tobytes())
    out, err = proc.communicate(timeout=240)
    lines = [line for line in err.splitlines() if line.strip()]
    assert (
        proc.returncode == 2 and len(lines) == 1 and f"shard {shard} changed on disk while the run read it" in lines[0]
    ), err
    saved = sorted(p.name for p in (tmp_path / "during" / "checkpoints").iterdir() if p.name.startswith("step"))
    assert saved and all(checkpoints.problem_with(tmp_path / "during" / "checkpoints" / n) is None for n in saved)


def test_damaged_datasets_are_named(env, prepared, tmp_path):
    run = tmp_path / "run"
    meta = json.loads((prepared / "meta.json").read_text())
    first = prepared / meta["splits"]["train"][0]["file"]

    assert "data.dtype=uint32 but" in bad_run(env, train_args(prepared, run, "data.dtype=uint32"))
    assert "fewer than one window of model.seq_len + 1" in bad_run(
        env, train_args(prepared, run, "model.seq_len=100000")
    )
    data = first.read_bytes()
    first.write_bytes(data[:-2])
    assert f"shard {first} has {len(data) - 2} bytes but meta.json says" in bad_run(env, train_args(prepared, run))
    first.unlink()
    assert f"shard {first} listed in meta.json is missing" in bad_run(env, train_args(prepared, run))
    assert not run.exists()


def test_bad_data_is_refused_before_torch_is_imported(tmp_path):
    """The launcher checks the data first, so a wrong data.dir costs a fraction of a second, not
    the seconds of importing torch and DeepSpeed."""
    args = train_args(tmp_path / "missing", tmp_path / "run")
    code = (
        f"import sys; from dist_lm.commands import train; "
        f"status = train.main({args!r}); print(status, 'torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr
    assert f"data.dir={tmp_path / 'missing'} does not exist" in proc.stderr and not (tmp_path / "run").exists()


def test_resuming_on_data_of_another_tokenizer_is_refused(env, ds_ops, prepared, cache_dir, tmp_path):
    run = tmp_path / "run"
    assert_ok(launch("python", train_args(prepared, run), env))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    embedded = next(cache_dir.glob("embedded-*"))
    line = bad_run(env, train_args(embedded, run, "train.max_steps=8"))
    assert f"{run / 'checkpoints' / 'step00000004'} was trained on tokens of tokenizer" in line
    assert "resume with the same data.dir, pass --allow-data-change" in line
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # the run is untouched
    # dist-lm evaluate on it advised raising model.vocab_size, which a trained model cannot
    proc = subprocess.run(
        [sys.executable, "-m", "dist_lm", "evaluate", str(run), "--data", str(embedded)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and f"{embedded} was made with tokenizer" in lines[0], proc.stderr
    assert "evaluate on data prepared with the run's tokenizer" in lines[0]


def test_token_id_check_reads_a_bounded_share_of_a_many_shard_corpus(tmp_path):
    # Every rank runs this check at start-up: its reading must not grow with the shard count.
    rng = np.random.default_rng(0)
    files = []
    for i in range(200):
        rng.integers(0, 300, 50_000, dtype=np.uint16).tofile(tmp_path / f"train-{i:03d}.bin")
        files.append({"file": f"train-{i:03d}.bin", "tokens": 50_000})
    meta = {"dtype": "uint16", "splits": {"train": files}}
    read = shards.check_token_ids(tmp_path, meta, vocab_size=320, budget_tokens=1 << 20)
    assert read <= max(1 << 20, 2 * 4096 * 200) + 16 * 4096 < 10_000_000 // 5  # a fifth of the corpus at most
    bad = np.fromfile(tmp_path / "train-123.bin", dtype=np.uint16)
    bad[-1] = 310  # the last token of one shard in the middle of the corpus
    bad.tofile(tmp_path / "train-123.bin")
    with pytest.raises(shards.UserError, match="train-123.bin holds token id 310, but model.vocab_size is 300"):
        shards.check_token_ids(tmp_path, meta, vocab_size=300, budget_tokens=1 << 20)


def test_a_dataset_is_readable_by_others_as_the_umask_says(corpus_dir, tmp_path):
    """The dataset directory came from tempfile.mkdtemp (drwx------): other users of a cluster could
    not read data prepared for them. Under umask 022 it is 0755 and its files 0644, as mkdir and
    open would make them."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(TOOL), str(corpus_dir), "--out", str(out), "--vocab-size", "300", "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.umask(0o022),
    )
    assert_ok(proc)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: 0o644 for p in out.iterdir()}
