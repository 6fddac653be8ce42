"""Weighted mixtures of datasets (data.mixture): the weights held over any 1,000 consecutive
samples, an order that does not depend on the rank count, an exact resume on another rank count,
a stated rule for new weights on resume, one tokenizer, and a validation loss per source."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_ok, launch, read_metrics
from dist_lm.config.batch import BatchSizes
from dist_lm.data import shards
from dist_lm.data.sampler import TrainData

WEIGHTS = [0.5, 0.3, 0.2]
SEQ = 16


@pytest.fixture
def sources(tmp_path, cache_dir):
    """Three datasets of numbered tokens with one tokenizer: source s's tokens start at s x 100,000,
    so a window names its source and its place by its first token."""
    tok = next(cache_dir.glob("embedded-*")) / "tokenizer.json"
    out = []
    for s, windows in enumerate([50, 30, 20]):
        tokens = [np.arange(s * 100_000 + i * 170, s * 100_000 + (i + 1) * 170) for i in range(windows * 16 // 170 + 1)]
        d = shards.write_dataset(tmp_path / f"s{s}", tok, 1 << 17, {"train": tokens, "val": tokens[:1]})
        out.append((d, shards.read_meta(d)))
    return out


def reads(
    sources, world: int, micro: int, accum: int, steps: int, state: dict | None = None, weights: list[float] = WEIGHTS
) -> tuple[list[list[int]], dict]:
    """The first token of every window read, per step, concatenated over ``world`` ranks; and the
    state after the last step."""
    per_step: list[list[int]] = [[] for _ in range(steps)]
    for rank in range(world):
        data = TrainData.mixture(
            [(d, m, w) for (d, m), w in zip(sources, weights)],
            SEQ,
            BatchSizes(micro, accum, world),
            rank,
            seed=5,
            device=torch.device("cpu"),
        )
        if state is not None:
            data.load_state_dict(state)
        for s in range(steps):
            per_step[s] += [int(x[i, 0]) for x, _ in data.next_batches() for i in range(len(x))]
        after = data.state_dict()
        data.close()
    return per_step, after


def test_the_weights_hold_over_any_1000_consecutive_samples(sources):
    steps, _ = reads(sources, 1, 100, 1, 60)
    source_of = np.array([t // 100_000 for step in steps for t in step])
    for start in range(0, len(source_of) - 1000, 250):
        shares = np.bincount(source_of[start : start + 1000], minlength=3) / 1000
        assert np.abs(shares - WEIGHTS).max() <= 0.01, (start, shares)


def test_the_order_does_not_depend_on_the_rank_count(sources):
    one, _ = reads(sources, 1, 12, 1, 6)
    for world, micro, accum in [(2, 3, 2), (3, 2, 2), (4, 3, 1)]:
        assert reads(sources, world, micro, accum, 6)[0] == one


def test_a_resume_on_another_rank_count_continues_every_source_exactly(sources):
    whole, _ = reads(sources, 1, 12, 1, 8)
    first, state = reads(sources, 2, 3, 2, 3)
    assert "source_samples" in state and sum(state["source_samples"]) == state["samples_consumed"] == 36
    rest, _ = reads(sources, 3, 2, 2, 5, state=json.loads(json.dumps(state)))  # through state.json
    assert first + rest == whole


def test_new_weights_on_resume_take_over_and_each_source_continues_where_it_stopped(sources):
    """The rule (docs/data.md): each source continues its own order at its count; from the resume
    on, positions are shared out by the new weights."""
    first, state = reads(sources, 1, 100, 1, 5)
    new = [0.2, 0.2, 0.6]
    rest, _ = reads(sources, 1, 100, 1, 20, state=state, weights=new)
    after = np.array([t for step in rest for t in step])
    shares = np.bincount(after // 100_000, minlength=3) / len(after)
    assert np.abs(shares - new).max() <= 0.01
    whole_old, _ = reads(sources, 1, 100, 1, 25)
    for s in range(3):  # the same sequence of windows per source as if the weights had not changed
        before = [t for step in first for t in step if t // 100_000 == s]
        following = [t for t in after if t // 100_000 == s]
        unchanged = [t for step in whole_old for t in step if t // 100_000 == s]
        n = min(len(before) + len(following), len(unchanged))
        assert (before + following)[:n] == unchanged[:n]


def test_a_run_on_a_mixture_reports_a_validation_loss_per_source(env, ds_ops, tmp_path, cache_dir):
    """Also the recipe options all on (tests/test_recipe.py), in bf16 at ZeRO-1 (a GPU run's
    default): the z-loss logged apart, and the export, in fp32 masters, gives transformers' Qwen3
    our logits with dropout off."""
    from test_prepare import run_tool, text
    from test_recipe import RECIPE
    from transformers import AutoModelForCausalLM

    from dist_lm.use.inference import load_model

    tok = next(cache_dir.glob("embedded-*")) / "tokenizer.json"
    for name, seed in (("prose", 0), ("code", 100)):
        src = tmp_path / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": text(seed + i, 400)}) + "\n" for i in range(40)))
        assert_ok(run_tool(src, "--out", tmp_path / name, "--tokenizer", tok, "--val-fraction", 0.2))
    mixture = f"data.mixture=[{{dir: {tmp_path / 'prose'}, weight: 0.7}}, {{dir: {tmp_path / 'code'}, weight: 0.3}}]"
    run = tmp_path / "run"
    assert_ok(
        launch(
            "python",
            [
                "--config",
                "debug",
                mixture,
                *RECIPE,
                "parallel.precision=bf16",
                "parallel.zero_stage=1",
                "train.max_steps=4",
                "train.eval_interval=2",
                "train.log_interval=2",
                f"run.dir={run}",
            ],
            env,
        )
    )
    rows, evals = read_metrics(run)
    assert len(evals) == 2 and len(rows) == 2
    for row in evals:
        assert row["val_loss"] == pytest.approx(0.7 * row["val_loss_prose"] + 0.3 * row["val_loss_code"], rel=1e-12)
    csv_rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert float([r for r in csv_rows if r["val_loss"]][-1]["val_loss_code"]) == pytest.approx(
        evals[-1]["val_loss_code"]
    )
    assert all(r["z_loss"] > 0 and r["loss"] > 0 for r in rows)
    assert all(r["z_loss"] for r in csv_rows if r["loss"])

    out = tmp_path / "hf"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "export_hf.py"), str(run), str(out), "--dtype", "fp32"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["attention_dropout"] == 0.0
    ours, cfg, _ = load_model(run)
    assert cfg.model.qk_norm and cfg.model.dropout == 0.1
    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=0)


def test_datasets_of_different_tokenizers_are_refused(env, tmp_path):
    from test_prepare import run_tool, text

    for name in ("a", "b"):
        src = tmp_path / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": text(ord(name) + i, 300)}) + "\n" for i in range(20)))
        assert_ok(run_tool(src, "--out", tmp_path / name, "--vocab-size", 300 + (name == "b")))
    proc = launch(
        "python",
        [
            "--config",
            "debug",
            f"data.mixture=[{{dir: {tmp_path / 'a'}, weight: 1}}, {{dir: {tmp_path / 'b'}, weight: 1}}]",
            f"run.dir={tmp_path / 'run'}",
        ],
        env,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "different tokenizers" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()
