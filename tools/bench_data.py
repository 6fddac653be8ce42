"""Data-path benchmark: the loader's tokens/s per rank, the content check of a run's start
(data.verify) per rank, the tokenizer's MB/s per worker, and prepare's peak memory on a .txt
file of one line.

    python tools/bench_data.py [--tokens 100_000_000] [--seq-len 2048] [--micro 8] [--accum 4]
                               [--text-mb 20] [--files 1] [--workers 1 2] [--one-line-mb 20]

The loader reads a synthetic dataset of random token ids from the page cache (it is read once
before timing) exactly as training does: permuted window ids, a gather per step, int64 tensors.
The content check hashes the same shards, from the page cache, in full and sampled, on one rank.
The tokenizer runs `dist-lm prepare`'s pipeline on the embedded corpus repeated to --text-mb,
in --files JSONL files. The one-line file is words without a line end, prepared by
`dist-lm prepare` (2 workers, a BPE trained on it) in a process of its own: its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dist_lm.config.batch import BatchSizes
from dist_lm.data import corpus, shards
from dist_lm.data.prepare import prepare
from dist_lm.data.sampler import TrainData


def bench_loader(work: Path, tokens: int, seq_len: int, micro: int, accum: int, steps: int) -> dict:
    tokenizer = (
        next(corpus.cache_root(None).glob("embedded-*/tokenizer.json"), None)
        or corpus.prepare(None, 4096) / "tokenizer.json"
    )
    rng = np.random.default_rng(0)
    docs = (rng.integers(0, 4096, size=10_000_000, dtype=np.uint16) for _ in range(tokens // 10_000_000))
    out = shards.write_dataset(work / "synthetic", tokenizer, 4096, {"train": docs}, shard_tokens=50_000_000)
    meta = shards.read_meta(out)
    for m in shards.open_split(out, meta, "train"):
        m.sum()  # into the page cache
    data = TrainData(out, meta, seq_len, BatchSizes(micro, accum, 1), 0, seed=0, device=torch.device("cpu"))
    data.next_batches()  # warm-up, starts the prefetch
    start = time.perf_counter()
    for _ in range(steps):
        data.next_batches()
    seconds = time.perf_counter() - start
    data.close()
    per_step = micro * accum * seq_len
    return {
        "tokens_per_s": steps * per_step / seconds,
        "ms_per_step": 1000 * seconds / steps,
        "tokens_per_step": per_step,
    }


def bench_verify(out: Path) -> dict:
    """data.verify on one rank, full and sampled, the shards in the page cache."""
    from dist_lm.data import integrity
    from dist_lm.data.checks import Source

    found = integrity.shards_of([Source("synthetic", out, shards.read_meta(out), 1.0)])
    result = {"gb": sum(s.size for s in found) / 1e9}
    for mode in ("full", "sampled"):
        start = time.perf_counter()
        assert integrity.check_content(found, mode, 0, 1) is None
        result[f"{mode}_s"] = time.perf_counter() - start
    return result


def bench_one_line(work: Path, mb: float) -> dict:
    """Peak memory of `dist-lm prepare` on a .txt file of one line of ``mb`` MB."""
    import resource
    import subprocess
    import sys

    words = "the of a model data token train rank shard window sample batch loss step".split()
    rng = np.random.default_rng(0)
    text = " ".join(words[i] for i in rng.integers(0, len(words), int(mb * 1e6 / 5.3)))
    (work / "one.txt").write_text(text)
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dist_lm",
            "prepare",
            str(work / "one.txt"),
            "--out",
            str(work / "one"),
            "--vocab-size",
            "300",
            "--workers",
            "2",
            "--quiet",
        ],
        check=True,
        capture_output=True,
    )
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"mb": len(text) / 1e6, "peak_gb": peak_kb / 1e6, "seconds": time.perf_counter() - start}


def bench_tokenizer(work: Path, text_mb: float, workers: int, files: int) -> dict:
    docs = corpus.documents()
    size = sum(len(d) for d in docs)
    sources = [work / "text" / f"{i:04d}.jsonl" for i in range(files)]
    if not sources[0].exists():
        sources[0].parent.mkdir()
        lines = [json.dumps({"text": d}) + "\n" for _ in range(max(1, int(text_mb * 1e6 / size))) for d in docs]
        for i, source in enumerate(sources):
            source.write_text("".join(lines[i::files]))
    tok = corpus.prepare(None, 4096) / "tokenizer.json"
    result = prepare(sources, work / f"tok{workers}", tok, 0, workers, 0.01, 0, progress=False)
    mb = result.stats.chars / 1e6
    return {
        "workers": workers,
        "mb": mb,
        "seconds": result.seconds,
        "mb_per_s": mb / result.seconds,
        "mb_per_s_per_worker": mb / result.seconds / workers,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=100_000_000)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--text-mb", type=float, default=20)
    p.add_argument("--files", type=int, default=1, help="input files the text is spread over")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--one-line-mb", type=float, default=20, help="size of the one-line .txt (0: skip it)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        r = bench_loader(work, args.tokens, args.seq_len, args.micro, args.accum, args.steps)
        print(
            f"loader: {r['tokens_per_s'] / 1e6:.1f} M tokens/s per rank ({r['ms_per_step']:.2f} ms per step of "
            f"{r['tokens_per_step']:,} tokens; seq {args.seq_len}, micro {args.micro} x accum {args.accum})"
        )
        v = bench_verify(work / "synthetic")
        print(
            f"content check (one rank, page cache): {v['gb']:.2f} GB in full {v['full_s']:.2f} s "
            f"({v['gb'] / v['full_s']:.1f} GB/s), sampled {v['sampled_s']:.3f} s"
        )
        if args.one_line_mb:
            o = bench_one_line(work, args.one_line_mb)
            print(f"prepare, one line of {o['mb']:.0f} MB: peak {o['peak_gb']:.2f} GB RSS, {o['seconds']:.0f} s")
        for w in args.workers:
            t = bench_tokenizer(work, args.text_mb, w, args.files)
            print(
                f"tokenizer: {w} worker(s): {t['mb_per_s']:.2f} MB/s, {t['mb_per_s_per_worker']:.2f} MB/s per worker "
                f"({t['mb']:.1f} MB in {args.files} file(s), {t['seconds']:.1f} s)"
            )


if __name__ == "__main__":
    main()
