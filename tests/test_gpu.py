"""On a CUDA machine (`pytest -m gpu`): the debug preset trains in bf16 through the engine and
reports MFU. Deselected by default (pyproject's addopts); CI has no GPU."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_ok, launch, read_metrics

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def needs_cuda():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests were selected (-m gpu) on a machine without CUDA")


def test_debug_preset_runs_in_bf16_and_reports_mfu(env, tmp_path):
    env = {**env, "DS_ACCELERATOR": "cuda"}
    proc = launch("python", ["--config", "configs/debug.yaml", f"run.dir={tmp_path}"], env)
    assert_ok(proc)
    assert "precision bf16 (auto: bf16" in proc.stdout
    train, evals = read_metrics(tmp_path)
    assert all(r["mfu"] is not None and 0 < r["mfu"] < 1 for r in train)
    assert train[-1]["loss"] < train[0]["loss"] and evals
