"""The recipe options users expect a config key away: dropout, QK-norm and the z-loss. Each
trains, is counted, and exports (QK-norm as Qwen3, dropout off) or is refused."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_ok, launch, read_metrics
from dist_lm.config.schema import ModelConfig
from dist_lm.model.transformer import Transformer

RECIPE = ["model.dropout=0.1", "model.qk_norm=true", "optim.z_loss=1e-4"]


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 512, "seq_len": 32, "d_model": 64, "n_layers": 2, "n_heads": 4, **kw})


def test_dropout_acts_while_training_only():
    torch.manual_seed(0)
    model = Transformer(tiny(dropout=0.2))
    x = torch.randint(0, 512, (2, 32))
    assert not torch.equal(model(x), model(x))  # two training forwards draw different masks
    model.eval()
    assert torch.equal(model(x), model(x))
    plain = Transformer(tiny())
    assert torch.equal(plain(x), plain(x))


def test_z_loss_adds_the_squared_log_partition_function():
    torch.manual_seed(0)
    model = Transformer(tiny())
    x, y = torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))
    ce = model(x, y)
    model.z_loss_coef = 1e-2
    with_z = model(x, y)
    logits = model(x).float().flatten(0, 1)
    z = torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(with_z, ce + 1e-2 * z)
    torch.testing.assert_close(model.z_loss, z)
    with_z.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_the_recipe_trains_logs_the_z_loss_apart_and_exports_as_qwen3(env, ds_ops, tmp_path):
    """bf16 at ZeRO-1 (a GPU run's default), all three options on; the export, in fp32 masters,
    gives transformers' Qwen3 our logits with dropout off."""
    from transformers import AutoModelForCausalLM

    from dist_lm.use.inference import load_model

    run = tmp_path / "run"
    assert_ok(launch("python", ["--config", "debug", *RECIPE, "parallel.precision=bf16", "parallel.zero_stage=1",
                                "train.max_steps=6", "train.log_interval=2", "train.eval_interval=3",
                                f"run.dir={run}"], env))
    rows, evals = read_metrics(run)
    assert len(rows) == 3 and len(evals) == 2
    assert all(r["z_loss"] > 0 and r["loss"] > 0 for r in rows)
    assert all(row["z_loss"] for row in csv.DictReader(open(run / "metrics.csv")) if row["loss"])

    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "export_hf.py"), str(run), str(out), "--dtype", "fp32"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["attention_dropout"] == 0.0
    ours, cfg, _ = load_model(run)
    assert cfg.model.qk_norm and cfg.model.dropout == 0.1
    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("override, fragment", [
    ("model.dropout=1", "model.dropout: must be in [0, 1)"),
    ("optim.z_loss=-1", "optim.z_loss: must be >= 0"),
    ("model.qk_norm=maybe", "model.qk_norm: expected bool"),
])
def test_bad_recipe_values_get_one_line(env, override, fragment, tmp_path):
    proc = launch("python", ["--config", "debug", override, f"run.dir={tmp_path / 'run'}"], env)
    assert proc.returncode == 2 and fragment in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()
