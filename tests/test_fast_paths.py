"""The paths that make a GPU run faster than plain PyTorch, checked where a CPU can check them:
the chunked cross-entropy (model.cross_entropy) gives the full loss and its gradients; fp8
(parallel.precision=fp8) is validated and refused off its GPUs with one line; the planner and
the trainer honour a GPU memory cap (DIST_LM_GPU_MEMORY_GB). The GPU halves are in test_gpu.py."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_ok, launch, read_metrics
from dist_lm.config.io import load_config
from dist_lm.config.schema import ConfigError, ModelConfig
from dist_lm.model.loss import CHUNKED_FROM_VOCAB, TrainingOptions, language_model_loss, uses_chunked
from dist_lm.model.transformer import Transformer


def deepspeed_rows(block_rows: int):
    """DeepSpeed's chunked cross-entropy as the engine hands it to the model, with small blocks so
    that a test's few rows are split into several."""
    from deepspeed.runtime.chunked_cross_entropy import chunked_cross_entropy

    return lambda logits, targets: chunked_cross_entropy(logits, targets, reduction="none", block_rows=block_rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_chunked_cross_entropy_gives_the_full_loss_and_gradients(dtype, z_loss):
    torch.manual_seed(0)
    logits = (3 * torch.randn(2, 24, 1000)).to(dtype)
    targets = torch.randint(0, 1000, (2, 24))
    results = []
    for rows in (None, deepspeed_rows(block_rows=7)):
        leaf = logits.clone().requires_grad_()
        loss, _, z = language_model_loss(leaf, targets, z_loss, rows)
        loss.backward()
        results.append((loss, z, leaf.grad))
    (full, full_z, full_grad), (chunked, chunked_z, chunked_grad) = results
    torch.testing.assert_close(chunked, full)
    if z_loss:
        torch.testing.assert_close(chunked_z, full_z)
    else:
        assert chunked_z is None and full_z is None
    assert chunked_grad.dtype == dtype  # written in the logits' own dtype, no fp32 copy
    # bf16: each side rounds its fp32 gradient to bf16 once
    torch.testing.assert_close(
        chunked_grad.float(), full_grad.float(), **({} if dtype == torch.float32 else {"atol": 1e-5, "rtol": 1e-2})
    )


def test_a_model_trains_the_same_through_either_loss():
    cfg = ModelConfig(vocab_size=512, seq_len=32, d_model=64, n_layers=2, n_heads=4)
    torch.manual_seed(0)
    full = Transformer(cfg)
    chunked = Transformer(cfg)
    chunked.load_state_dict(full.state_dict())
    x, y = torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))
    full.use(TrainingOptions(z_loss_coef=1e-3))
    chunked.use(TrainingOptions(z_loss_coef=1e-3, row_losses=deepspeed_rows(block_rows=16)))
    parts = {}
    for model in (full, chunked):
        parts[model] = model(x, y)
        parts[model].total.backward()
    torch.testing.assert_close(parts[chunked].z, parts[full].z)
    for (name, a), b in zip(full.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


def test_chunked_is_chosen_for_large_vocabularies_in_eager_gpu_runs_and_counted_by_the_memory_model():
    from dist_lm.plan import memory

    llama3 = load_config("h100-80gb", ["model.vocab_size=128256", "parallel.compile=false"])
    gpt2 = load_config("h100-80gb", ["model.vocab_size=50304", "parallel.compile=false"])
    assert uses_chunked(llama3.model, on_gpu=True, compiled=False)
    assert not uses_chunked(llama3.model, on_gpu=True, compiled=True)  # compiled, the full loss is fused
    assert not uses_chunked(llama3.model, on_gpu=False, compiled=False)
    assert not uses_chunked(gpt2.model, on_gpu=True, compiled=False) and 50304 < CHUNKED_FROM_VOCAB <= 128256
    assert uses_chunked(load_config("debug", ["model.cross_entropy=chunked"]).model, on_gpu=False, compiled=False)
    full = load_config("h100-80gb", ["model.vocab_size=128256", "model.cross_entropy=full", "parallel.compile=false"])
    chunked, eager = (memory.estimate(c.model, c.parallel, "bf16", 4, 1) for c in (llama3, full))
    tokens = 4 * llama3.model.seq_len
    assert chunked.logits == tokens * 128256 * 2 * 2  # bf16 logits and their bf16 gradient
    assert eager.logits == tokens * 128256 * (4 + 4 + 2)  # fp32 log-softmax, its fp32 gradient, the bf16 cast
    with pytest.raises(ConfigError, match="model.cross_entropy: expected one of"):
        load_config("debug", ["model.cross_entropy=fused"])


def test_fp8_config_is_validated():
    assert load_config("h100-80gb", ["parallel.precision=fp8"]).parallel.fp8_recipe == "tensorwise"
    with pytest.raises(ConfigError, match="parallel.precision: fp8 needs parallel.compile=true"):
        load_config("debug", ["parallel.precision=fp8"])
    with pytest.raises(ConfigError, match="parallel.fp8_recipe: expected one of 'tensorwise', 'rowwise'"):
        load_config("h100-80gb", ["parallel.precision=fp8", "parallel.fp8_recipe=axiswise"])


def test_fp8_converts_the_blocks_linear_layers_only():
    from dist_lm.runtime.fp8 import converted_layers
    from dist_lm.runtime.precision import Precision

    model = Transformer(ModelConfig(vocab_size=512, seq_len=32, d_model=64, n_layers=2, n_heads=4))
    layers = converted_layers(model)
    assert len(layers) == 2 * 7 and "lm_head" not in layers and all(n.startswith("blocks.") for n in layers)
    assert not converted_layers(
        Transformer(ModelConfig(vocab_size=512, seq_len=32, d_model=72, n_layers=1, n_heads=4))
    )  # sides not multiples of 16
    fp8 = Precision("fp8")  # bf16 to DeepSpeed and to the memory model
    assert (fp8.dtype, fp8.deepspeed_section, fp8.bytes_per_weight, fp8.accumulates_in_fp32) == (
        torch.bfloat16,
        "bf16",
        2,
        True,
    )


def test_fp8_on_a_cpu_is_one_line_and_nothing_written(env, tmp_path):
    run = tmp_path / "run"
    proc = launch(
        "python", ["--config", "debug", "parallel.precision=fp8", "parallel.compile=true", f"run.dir={run}"], env
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "parallel.precision: fp8 needs a CUDA GPU of compute capability 8.9 or more" in lines[0]
    assert not run.exists()


def test_a_gpu_memory_cap_is_what_the_planner_plans_for(monkeypatch):
    from dist_lm.config.errors import UserError
    from dist_lm.runtime import hardware

    monkeypatch.setenv(hardware.MEMORY_CAP_VARIABLE, "12")
    assert hardware.gpu_memory_cap_gb() == 12.0
    assert hardware.apply_gpu_memory_cap(torch.device("cpu")) == ""  # nothing to cap on a CPU
    monkeypatch.setenv(hardware.MEMORY_CAP_VARIABLE, "twelve")
    with pytest.raises(UserError, match="DIST_LM_GPU_MEMORY_GB='twelve' is not a positive number of GB"):
        hardware.gpu_memory_cap_gb()


def test_a_chunked_loss_run_trains_in_bf16(env, tmp_path):
    """The engine hands the model DeepSpeed's chunked cross-entropy (its PyTorch backend on a CPU)."""
    proc = launch(
        "python",
        [
            "--config",
            "debug",
            "model.cross_entropy=chunked",
            "parallel.precision=bf16",
            "optim.z_loss=1e-4",
            "train.max_steps=6",
            "train.log_interval=2",
            "train.eval_interval=0",
            f"run.dir={tmp_path}",
        ],
        env,
    )
    assert_ok(proc)
    assert "loss: DeepSpeed's chunked cross-entropy" in proc.stdout
    train, _ = read_metrics(tmp_path)
    assert [r["step"] for r in train] == [2, 4, 6] and train[-1]["loss"] < train[0]["loss"]
    assert all(r["z_loss"] > 0 for r in train)


def test_a_first_run_announces_deepspeeds_op_build(tmp_path, monkeypatch, ds_ops):
    """A run's first start on a CPU sat silent for 40-105 s while DeepSpeed built its ops; the log
    now says so on the line before, when torch's extension cache lacks them."""
    from dist_lm.config.schema import ParallelConfig
    from dist_lm.runtime.op_builds import ops_to_build

    cpu = torch.device("cpu")
    assert ops_to_build(cpu, ParallelConfig()) == []  # built by the fixture: nothing to wait for
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # a cache that has nothing yet
    assert ops_to_build(cpu, ParallelConfig(zero_stage=1, offload_optimizer=True)) == ["deepspeed_shm_comm", "cpu_adam"]
