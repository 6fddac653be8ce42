"""Document-aware packing (data.document_mask): a packed window gives each document the outputs it
would have alone in a window of its own, and a run trains with it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_ok, launch, read_metrics
from dist_lm.config.io import load_config
from dist_lm.config.schema import ConfigError, ModelConfig
from dist_lm.model.documents import document_ids
from dist_lm.model.transformer import Transformer

EOT = 3


@pytest.mark.parametrize(
    "kw", [{}, {"position": "learned"}, {"position": "none", "n_kv_heads": 2}, {"qk_norm": True, "activation": "gelu"}]
)
def test_each_document_of_a_packed_window_is_computed_as_if_alone(kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, seq_len=32, d_model=32, n_layers=2, n_heads=4, **kw)
    model = Transformer(cfg).eval()
    docs = [torch.randint(4, 64, (n,)) for n in (9, 13, 10)]
    docs = [torch.cat([d[:-1], torch.tensor([EOT])]) for d in docs]  # each closed by end-of-text
    packed = torch.cat(docs)[None]
    ids = document_ids(packed, EOT)
    assert ids[0].tolist() == [0] * 9 + [1] * 13 + [2] * 10
    with torch.no_grad():
        together = model(packed, documents=ids)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
        plain = model(packed)[0]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    assert not torch.allclose(plain[9:], alone[9:], atol=1e-3)  # without the mask, documents see each other


def test_gradients_flow_through_the_document_mask():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=1, n_heads=2))
    x = torch.randint(0, 64, (2, 16))
    x[:, 5] = EOT
    model(x, torch.randint(0, 64, (2, 16)), documents=document_ids(x, EOT)).total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_run_trains_with_document_masks_and_refuses_what_cannot_combine(env, ds_ops, tmp_path):
    run = tmp_path / "run"
    assert_ok(
        launch(
            "python",
            [
                "--config",
                "debug",
                "data.document_mask=true",
                "train.max_steps=4",
                "train.log_interval=2",
                "train.eval_interval=4",
                f"run.dir={run}",
            ],
            env,
        )
    )
    rows, evals = read_metrics(run)
    assert len(rows) == 2 and len(evals) == 1 and evals[0]["val_loss"] > 0
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "export_hf.py"), str(run), str(tmp_path / "hf")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "Hugging Face's default attention does not mask documents" in proc.stdout, (
        proc.stderr
    )
    for override, fragment in (
        ("model.position=bias", "data.document_mask: does not combine with model.position=bias"),
        ("model.dropout=0.1", "data.document_mask: does not combine with model.dropout"),
    ):
        with pytest.raises(ConfigError, match=fragment):  # the launcher's one line, exit 2 (tests/test_cli.py)
            load_config("debug", ["data.document_mask=true", override])
