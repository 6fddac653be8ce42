"""Layouts past data parallelism on CPU: the real DeepSpeed engine over gloo, its all-to-all
included, in real processes, against one rank on the same global batch.

Sequence parallelism (DeepSpeed's Ulysses) at 2 ranks and at 2 x 2 data x sequence on 4; fp32
runs within the engine tests' 1e-4 of the plain-PyTorch reference, bf16 at every ZeRO stage
within their 0.01 (tests/test_parallel_layouts_bf16.py). Checkpoints resume across layouts and
export the one-rank run's weights.
(Four data-parallel ranks resumed as 2 x 2: tests/test_engine_launchers.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from engine_runs import COMMON, LAYOUTS, SEQUENCE_2, TENSOR_2, run_and_read
from safetensors.torch import load_file

from conftest import assert_ok, assert_one_hang_line, launch, read_metrics, stop_one_of_two_ranks
from dist_lm.config.errors import ConfigError
from dist_lm.config.io import load_config
from dist_lm.config.layout import ParallelLayout, parallel_layout
from dist_lm.model.layers import MLP, Attention
from dist_lm.model.loss import TrainingOptions
from dist_lm.model.sequence import SequenceShard
from dist_lm.model.transformer import Transformer
from dist_lm.plan.memory import estimate
from dist_lm.runtime.parallel import tiled_mlp
from dist_lm.train.exits import Exit
from dist_lm.use.export import export_hf


def run_tool(args: list, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dist_lm", *map(str, args)], env=env, capture_output=True, text=True)
    assert_ok(proc)
    return proc


@pytest.mark.parametrize("kind", LAYOUTS)
def test_two_ranks_of_one_group_match_one_rank_and_export_its_weights(
    tmp_path, env, ds_ops, reference, monkeypatch, kind
):
    """The same global batch of 8 as micro 2 x accumulation 4 on two ranks that split each window
    (sequence) or each linear layer (tensor): the reference's losses, one rank's validation
    losses, and after six steps its weights (the export gathers a tensor-parallel run's shards).
    evaluate and generate read the checkpoint as they read any other."""
    proc, losses, vals = run_and_read(tmp_path / "split", "torchrun", ["parallel.zero_stage=1", LAYOUTS[kind]], env)
    assert f"1 data x 2 {kind} parallel; batch 8 = micro 2 x accum 4 x data-parallel ranks 1" in proc.stdout
    assert losses == pytest.approx(reference, abs=1e-4)
    run = tmp_path / "split" / "run"
    evaluated = run_tool(["evaluate", run, "--samples", "7", "--json"], env)
    assert json.loads(evaluated.stdout.splitlines()[-1])["loss"] == pytest.approx(vals[-1], abs=1e-4)
    sample = run_tool(["generate", run, "--prompt", "The", "--max-tokens", "8", "--temperature", "0"], env)
    assert sample.stdout.startswith("The")
    _, _, one_rank_vals = run_and_read(tmp_path / "one", "python", ["parallel.zero_stage=1"], env, nproc=1)
    assert vals == pytest.approx(one_rank_vals, abs=1e-4)
    monkeypatch.setenv("DIST_LM_CACHE", env["DIST_LM_CACHE"])  # where the runs' tokenizer is
    for name in ("split", "one"):
        export_hf(tmp_path / name / "run", tmp_path / f"{name}-hf")
    ours, theirs = (load_file(tmp_path / f"{name}-hf" / "model.safetensors") for name in ("split", "one"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].shape == theirs[key].shape, key
        assert torch.allclose(ours[key], theirs[key], atol=1e-4, rtol=0), key


@pytest.mark.parametrize("kind", LAYOUTS)
def test_two_by_two_matches_and_resumes_on_two_ranks_of_one_group(tmp_path, env, ds_ops, reference, kind):
    """Four ranks as 2 data x 2 sequence or tensor parallel at ZeRO-2; the step-3 checkpoint
    resumes on two ranks as 1 x 2 (another rank count: DeepSpeed's universal format, which
    joins a tensor-parallel run's shards) on the reference's course."""
    layout = ["parallel.zero_stage=2", LAYOUTS[kind]]
    proc, losses, _ = run_and_read(tmp_path, "torchrun", [*layout, "checkpoint.interval=3"], env, nproc=4)
    assert f"2 data x 2 {kind} parallel; batch 8 = micro 2 x accum 2 x data-parallel ranks 2" in proc.stdout
    assert losses == pytest.approx(reference, abs=1e-4)
    step3, two = tmp_path / "run" / "checkpoints" / "step00000003", tmp_path / "two"
    resumed = launch("torchrun", ["--config", "debug", *COMMON, *layout, f"run.dir={two}", "--resume", step3], env)
    assert_ok(resumed)
    assert "via DeepSpeed's universal format (saved on 4 ranks" in resumed.stdout
    train, _ = read_metrics(two)
    assert [r["step"] for r in train] == [4, 5, 6]
    assert [r["loss"] for r in train] == pytest.approx(reference[3:], abs=1e-4)


def test_the_tiled_mlp_gives_the_same_losses_at_zero3_with_sequence_parallelism(tmp_path, env, ds_ops):
    """parallel.tiled_mlp (DeepSpeed's TiledMLP: 2 tiles of each rank's 256 tokens) where it is
    meant to serve, long windows split over ranks, at ZeRO-3 (whose gathers run in each tile's
    recompute) in bf16: the untiled run's losses."""
    args = ["--config", "debug", *COMMON, "parallel.zero_stage=3", "parallel.precision=bf16", SEQUENCE_2]
    args += ["model.seq_len=512", "train.max_steps=3", "train.eval_interval=0", "checkpoint.interval=0"]
    losses = {}
    for tiled in ("false", "true"):
        assert_ok(launch("torchrun", [*args, f"parallel.tiled_mlp={tiled}", f"run.dir={tmp_path / tiled}"], env))
        losses[tiled] = [r["loss"] for r in read_metrics(tmp_path / tiled)[0]]
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-3)


def test_the_tiled_mlp_computes_the_mlp_and_its_gradients():
    cfg = load_config("debug", ["model.vocab_size=64"]).model
    torch.manual_seed(0)
    mlp, x = MLP(cfg), torch.randn(2, 300, cfg.d_model, requires_grad=True)
    whole = mlp(x)
    (whole * whole).sum().backward()
    expected = [x.grad.clone(), *(p.grad.clone() for p in mlp.parameters())]
    x.grad = None
    mlp.zero_grad()
    tiled = tiled_mlp(mlp, x)  # 3 tiles of 100 and 128-wide rows
    (tiled * tiled).sum().backward()
    assert torch.allclose(tiled, whole, atol=1e-6)
    for got, want in zip([x.grad, *(p.grad for p in mlp.parameters())], expected):
        assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("kind", LAYOUTS)
def test_a_stopped_rank_of_a_group_ends_the_other_within_its_timeout(tmp_path, env, kind):
    """SIGSTOP one rank of a sequence or tensor group: its partner, blocked in the group's
    all-to-all or all-reduce, ends within parallel.timeout_minutes with one line naming it and
    the exit status of a hang, as a data-parallel rank does (tests/test_checkpoints.py)."""
    args = ["--config", "debug", "train.max_steps=100000", "train.log_interval=1", "train.eval_interval=0"]
    args += ["parallel.timeout_minutes=0.25", LAYOUTS[kind], f"run.dir={tmp_path}"]
    rank0, pid1, _ = stop_one_of_two_ranks(args, env, tmp_path)
    assert rank0.returncode == Exit.HANG, rank0.stderr[-3000:]  # (bounded: the helper waits 300 s at most)
    assert_one_hang_line(rank0.stderr, pid1, 0.25)


def test_document_masks_give_one_ranks_losses_with_sequence_parallelism(tmp_path, env, ds_ops):
    """data.document_mask: the mask and the positions that restart at each document are the
    whole window's, which attention sees gathered; the same losses as one rank."""
    masked = ["parallel.zero_stage=1", "data.document_mask=true"]
    _, split, split_vals = run_and_read(tmp_path / "sp", "torchrun", [*masked, SEQUENCE_2], env)
    _, whole, whole_vals = run_and_read(tmp_path / "one", "python", masked, env, nproc=1)
    assert split == pytest.approx(whole, abs=1e-4) and split_vals == pytest.approx(whole_vals, abs=1e-4)


@pytest.mark.parametrize(
    "ranks,overrides,message",
    [
        (2, ["parallel.sequence_parallel_size=3"], "parallel.sequence_parallel_size: 3 does not divide the 2 ranks"),
        (4, ["parallel.sequence_parallel_size=4"], "4 must divide the key/value heads (2)"),
        (4, ["parallel.sequence_parallel_size=4", "model.n_kv_heads=4", "model.seq_len=130"], "model.seq_len (130)"),
        (2, [SEQUENCE_2, "model.position=bias"], "needs model.position rope, learned or none"),
        (2, [SEQUENCE_2, "model.layer_types=mlp,moe", "model.n_experts=2"], "does not work with moe layers yet"),
        (2, ["parallel.sequence_parallel_size=0"], "parallel.sequence_parallel_size: must be positive"),
        (2, ["parallel.tensor_parallel_size=3"], "parallel.tensor_parallel_size: 3 does not divide the 2 ranks"),
        (4, [TENSOR_2, SEQUENCE_2], "AutoTP and Ulysses groups do not combine"),
        (4, ["parallel.tensor_parallel_size=4", "model.n_kv_heads=4", "model.ffn_hidden=130"], "MLP's width (130)"),
        (2, [TENSOR_2, "parallel.precision=fp8", "parallel.compile=true"], "does not work with parallel.precision=fp8"),
        (
            2,
            [TENSOR_2, "parallel.zero_stage=3", "parallel.compile=true", "parallel.deepcompile=true"],
            "does not work with DeepCompile",
        ),
        (2, [SEQUENCE_2, "parallel.tiled_mlp=true", "parallel.compile=true"], "parallel.tiled_mlp: runs eager"),
        (
            "4/2",
            ["parallel.zero_stage=3", "parallel.zero_hpz_partition_size=4", "train.micro_batch_size=2"],
            "parallel.zero_hpz_partition_size: 4 does not divide the 2 ranks per node of this launch (2 nodes)",
        ),
    ],
)
def test_a_bad_layout_is_one_line_and_writes_nothing(tmp_path, env, ranks, overrides, message):
    """Checked before torch is imported, before any rank waits for the others: rank 0 alone says so.
    ``ranks`` "4/2": four ranks, two a node."""
    ranks, _, per_node = str(ranks).partition("/")
    ranks_env = {"WORLD_SIZE": ranks, "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": per_node or ranks}
    run_dir = tmp_path / "run"
    proc = launch("python", ["--config", "debug", *overrides, f"run.dir={run_dir}"], {**env, **ranks_env}, nproc=1)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr
    assert not run_dir.exists()


def test_the_layout_puts_a_sequence_group_on_consecutive_ranks():
    model = load_config("debug", []).model
    layouts = [parallel_layout(load_config("debug", [SEQUENCE_2]).parallel, model, 4, r) for r in range(4)]
    assert [(x.dp_rank, x.sp_rank) for x in layouts] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [x.model_parallel_group() for x in layouts] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert layouts[0].dp_size == 2 and layouts[0].zero_shards == 4
    assert layouts[0].describe() == "2 data x 2 sequence parallel"
    tensor = parallel_layout(load_config("debug", [TENSOR_2]).parallel, model, 4, 3)
    assert (tensor.dp_rank, tensor.tp_rank, tensor.dp_size, tensor.zero_shards, tensor.loss_copies) == (1, 1, 2, 2, 2)
    assert tensor.describe() == "2 data x 2 tensor parallel"
    with pytest.raises(ConfigError, match="does not divide the 6 ranks; use one of"):
        parallel_layout(load_config("debug", ["parallel.sequence_parallel_size=4"]).parallel, model, 6)


def test_the_shares_of_a_window_sum_to_its_loss():
    """Without the all-to-all (one process), each share attends only over itself, so this holds
    the loss arithmetic, not attention: a model whose attention sees nothing but the token
    itself is checked, with the shares' cross-entropy summing to the window's mean."""
    cfg = load_config("debug", ["model.vocab_size=64", "model.seq_len=16"]).model
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    for block in model.blocks:  # attention to the token itself only: the same for a share as for the window
        block.attn.attend.forward = lambda q, k, v, pos: v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
    whole = model(idx, targets).cross_entropy
    shares = []
    for i in range(4):
        model.use(TrainingOptions(sequence_shard=SequenceShard(i, 4)))
        shares.append(model(idx, targets).cross_entropy)
    assert torch.stack(shares).sum().item() == pytest.approx(whole.item(), abs=1e-6)


def test_the_memory_model_splits_activations_and_states_over_the_layout():
    cfg = load_config("debug", ["model.vocab_size=512"])
    one = estimate(cfg.model, cfg.parallel, "bf16", 4, ParallelLayout(2, 0))
    split = estimate(cfg.model, cfg.parallel, "bf16", 4, ParallelLayout(4, 0, sequence_parallel_size=2))
    assert split.activations == pytest.approx(one.activations / 2)
    assert split.logits == pytest.approx(one.logits / 2)
    assert split.optimizer == pytest.approx(one.optimizer / 2)  # ZeRO-1 over all four ranks
    assert split.buffers > one.buffers  # the all-to-all's copies
    tensor = estimate(cfg.model, cfg.parallel, "bf16", 4, ParallelLayout(4, 0, tensor_parallel_size=2))
    linear = cfg.model.n_layers * (Attention.parameter_count(cfg.model) + MLP.parameter_count(cfg.model))
    assert one.weights - tensor.weights == pytest.approx(2 * linear / 2)  # bf16: half the blocks' linear layers
    assert tensor.optimizer < one.optimizer and tensor.activations < one.activations
    tiled = estimate(cfg.model, replace(cfg.parallel, tiled_mlp=True), "bf16", 4, ParallelLayout(2, 0))
    per_token = MLP.saved_bytes_per_token(cfg.model, 2, compiled=False)
    tokens = 4 * cfg.model.seq_len
    kept = (cfg.model.n_layers + 1) * tokens  # every block, and eager one more in backward
    assert one.activations - tiled.activations == pytest.approx(per_token * (kept - 4 * 128))  # less one tile
