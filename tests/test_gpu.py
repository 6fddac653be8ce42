"""On a CUDA machine (`pytest -m gpu`): the debug preset trains in bf16 through the engine and
reports MFU. Deselected by default (pyproject's addopts); CI has no GPU."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_ok, hooked, launch, log_order, read_metrics

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
    from dist_lm.observe.metrics import RunSummary

    summary = RunSummary.read(tmp_path)  # with the memory estimate, which only a GPU run makes
    assert summary.precision == "bf16" and 0 < summary.predicted_peak_mem_gb < 139 and summary.first_step_s > 0


@pytest.mark.parametrize(
    "case",
    [
        "rtx-12gb parallel.activation_checkpointing=false train.micro_batch_size=8",
        "rtx-12gb parallel.zero_stage=2 parallel.activation_checkpointing=true",
        "rtx-12gb parallel.activation_checkpointing=false parallel.compile=true "
        "model.activation=gelu train.micro_batch_size=16",
        "rtx-12gb parallel.precision=bf16-autocast parallel.zero_stage=0 "
        "parallel.activation_checkpointing=false parallel.compile=true train.micro_batch_size=16",
    ],
)
def test_memory_estimate_within_15_percent(env, tmp_path, monkeypatch, case):
    import runpy

    from conftest import ROOT

    run_case = runpy.run_path(str(ROOT / "tools" / "bench_memory.py"))["run_case"]

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    result = run_case(case, torch.cuda.device_count() if "zero_stage=2" in case else 1, tmp_path)
    assert "measured_gb" in result, result
    assert abs(result["error"]) < 0.15, result


def test_bf16_autocast_step_waits_for_the_gpu_only_in_its_log_rows(env, tmp_path):
    """The small-model fast path (bf16-autocast at ZeRO-0) keeps the host ahead of the GPU: the
    step makes no host-device sync (its skip flag comes back through pinned memory,
    dist_lm.train.faults.FlagInFlight); a metrics row reads the loss, on purpose, every
    train.log_interval steps. Audited steps 4-7 hold the log row of step 5, which shows that the
    audit sees syncs; a sync anywhere else in the step fails the test before it shows in tokens/s."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    report = tmp_path / "syncs.json"
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "sync_audit.py"),
        "--from-step",
        "4",
        "--steps",
        "4",
        "--json",
        str(report),
        "--",
        "--config",
        "debug",
        "parallel.precision=bf16-autocast",
        "parallel.zero_stage=0",
        "train.max_steps=10",
        "train.log_interval=5",
        "train.eval_interval=0",
        "train.sample_tokens=0",
        "logging.wandb=disabled",
        "logging.progress=false",
        f"run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(cmd, env={**env, "DS_ACCELERATOR": "cuda"}, capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    audit = json.loads(report.read_text())
    assert audit["syncs"] >= 1, audit  # the log row's
    assert all("_train_metrics" in s["stack"] for s in audit["stacks"]), audit


# ~100M parameters at seq 2048 in the debug preset: micro-batch 64 takes about 61 GB (eager).
MODEL_100M = ["model.d_model=1024", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=8", "model.seq_len=2048"]


def test_running_out_of_gpu_memory_is_one_line_and_its_own_exit_status(env, tmp_path):
    from dist_lm.train.exits import Exit

    proc = launch(
        "python",
        [
            "--config",
            "debug",
            *MODEL_100M,
            "train.micro_batch_size=512",
            "train.global_batch_size=512",
            "parallel.compile=false",
            f"run.dir={tmp_path}",
        ],
        {**env, "DS_ACCELERATOR": "cuda"},
    )
    assert proc.returncode == Exit.OUT_OF_MEMORY, proc.stderr[-3000:]
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: rank 0 ran out of GPU memory at micro-batch 512 x seq 2048: lower train.micro_batch_size")
    ), proc.stderr


def test_find_batch_stops_at_the_edge_of_the_budget(env):
    """tools/find_batch.py with real runs: the size it names fits the budget, the next one does not."""
    import re
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "find_batch.py"), "--config", "debug", "--limit", "4096", *MODEL_100M],
        env={**env, "DS_ACCELERATOR": "cuda"},
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    best = int(re.search(r"train.micro_batch_size=(\d+)", proc.stdout).group(1))
    budget = float(re.search(r"budget ([\d.]+) GB", proc.stdout).group(1))
    probes = {int(m): rest for m, rest in re.findall(r"micro-batch (\d+): (.*)", proc.stdout)}
    assert 4 < best < 4096, proc.stdout
    assert float(re.search(r"peak ([\d.]+) GB", probes[best]).group(1)) <= budget
    assert "over the budget" in probes[best + 1] or "out of memory" in probes[best + 1], proc.stdout


def test_zero3_under_deepcompile_resumes_where_it_stopped(env, tmp_path):
    """A run stopped at step 4 and resumed. DeepCompile's passes change five steps after the start
    (dist_lm.runtime.engine.deepcompile_schedule): after step 5 in the uninterrupted run, after step 9 in
    the resumed one. So step 5, the first after the resume, is compiled alike in both and must match
    to bf16's noise (2e-3); steps 6-8 run differently compiled graphs and match within 2e-2 (they
    differed by up to 0.010 on an H100), far less than training moves the loss (0.33 in 8 steps)."""
    args = [
        "--config",
        "debug",
        "parallel.zero_stage=3",
        "parallel.compile=true",
        "parallel.deepcompile=true",
        "train.max_steps=8",
        "train.log_interval=1",
        "train.eval_interval=0",
        "checkpoint.interval=0",
    ]
    env = {**env, "DS_ACCELERATOR": "cuda"}
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert_ok(launch("python", [*args, f"run.dir={whole}"], env))
    assert_ok(launch("python", [*args, "train.stop_at_step=4", f"run.dir={stopped}"], env))
    resumed = launch("python", [*args, f"run.dir={stopped}"], env)
    assert_ok(resumed)
    assert "at step 4 " in resumed.stdout and "ZeRO stage 3, DeepCompile;" in resumed.stdout
    assert "step 10 again for its prefetching" in resumed.stdout
    expected = {r["step"]: r["loss"] for r in read_metrics(whole)[0]}
    got = {r["step"]: r["loss"] for r in read_metrics(stopped)[0]}
    assert list(got) == list(expected) == list(range(1, 9))
    assert [got[s] for s in range(1, 6)] == pytest.approx([expected[s] for s in range(1, 6)], abs=2e-3)
    assert [got[s] for s in range(6, 9)] == pytest.approx([expected[s] for s in range(6, 9)], abs=2e-2)
    assert expected[1] - expected[8] > 0.2


@pytest.mark.parametrize("precision,stage", [("bf16", 1), ("bf16-autocast", 0)])
def test_compiled_run_lifecycle_train_stop_resume_best_evaluate_generate_export(env, tmp_path, precision, stage):
    """The precisions and compile mode GPU runs use (bf16 at ZeRO-1 is DeepSpeed's BF16_Optimizer;
    bf16-autocast at ZeRO-0, fp32 weights under autocast, the planner's choice for one GPU):
    a run stopped at step 4 and resumed to 8; --best names the checkpoint with the lowest
    validation loss; evaluate gives the loop's validation loss; generate samples from it; the
    export loads in transformers with our logits."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    run = tmp_path / "run"
    env = {**env, "DS_ACCELERATOR": "cuda"}
    args = [
        "--config",
        "debug",
        f"parallel.precision={precision}",
        f"parallel.zero_stage={stage}",
        "parallel.compile=true",
        "train.max_steps=8",
        "train.log_interval=1",
        "train.eval_interval=2",
        "train.eval_samples=32",
        "checkpoint.interval=2",
        "checkpoint.keep_last=1",
        f"run.dir={run}",
    ]
    assert_ok(launch("python", [*args, "train.stop_at_step=4"], env))
    resumed = launch("python", args, env)
    assert_ok(resumed)
    assert "at step 4 " in resumed.stdout and "begin bf16_optimizer" not in resumed.stdout
    val = {r["step"]: r["val_loss"] for r in read_metrics(run)[1]}
    best = min(val, key=val.get)
    assert (run / "checkpoints" / "best").read_text() == f"step{best:08d}"

    def tool(name, *extra):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tools" / name), *map(str, extra)],
            env=env,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    evaluated = json.loads(tool("evaluate.py", run, "--best", "--samples", "32", "--micro-batch", "4", "--json"))
    assert evaluated["checkpoint"].endswith(f"step{best:08d}")
    assert evaluated["loss"] == pytest.approx(val[best], abs=2e-3)  # eager against the loop's compiled forward
    assert tool("generate.py", run, "--best", "--prompt", "The", "--max-tokens", "16").startswith("The")
    tool("export_hf.py", run, tmp_path / "hf", "--best")

    from transformers import AutoModelForCausalLM

    from dist_lm.model.loss import TrainingOptions
    from dist_lm.use.inference import load_model

    ours, _, _ = load_model(run, best=True)
    ours.use(TrainingOptions())  # computed in fp32 on both sides
    exported = ours.to(torch.bfloat16).float() if precision == "bf16" else ours  # as the export holds them
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, exported(ids), atol=1e-4, rtol=0)


def test_document_masks_through_flexattention_equal_the_dense_mask(env):
    """On a GPU documents attend apart through FlexAttention's block mask; the same model on the
    CPU, which takes the dense-mask path, gives the same logits, and gradients flow."""
    import copy

    from dist_lm.config.schema import ModelConfig
    from dist_lm.model.documents import document_ids
    from dist_lm.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, seq_len=256, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2)
    on_cpu = Transformer(cfg)
    model = copy.deepcopy(on_cpu).cuda()
    x = torch.randint(4, 512, (2, 256))
    x[:, [40, 100, 101, 180]] = 3
    ids = document_ids(x, 3)
    with torch.no_grad():
        flex = model(x.cuda(), documents=ids.cuda()).cpu()
        dense = on_cpu(x, documents=ids)
    torch.testing.assert_close(flex, dense, atol=2e-4, rtol=1e-3)
    model(x.cuda(), torch.randint(0, 512, (2, 256)).cuda(), documents=ids.cuda()).total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("stage,checkpointing", [(0, False), (1, False), (2, True), (3, False)])
def test_fp8_trains_stops_resumes_and_exports(env, tmp_path, stage, checkpointing):
    """parallel.precision=fp8 through the engine at every ZeRO stage, the whole model compiled (at
    ZeRO-2 with activation checkpointing): it trains, a stopped run resumes, and its checkpoint
    exports like a bf16 one."""
    import subprocess
    import sys

    from conftest import ROOT

    run = tmp_path / "run"
    env = {**env, "DS_ACCELERATOR": "cuda"}
    args = [
        "--config",
        "debug",
        "parallel.precision=fp8",
        f"parallel.zero_stage={stage}",
        "parallel.compile=true",
        f"parallel.activation_checkpointing={str(checkpointing).lower()}",
        "train.max_steps=8",
        "train.log_interval=1",
        "train.eval_interval=4",
        "checkpoint.interval=4",
        f"run.dir={run}",
    ]
    first = launch("python", [*args, "train.stop_at_step=4"], env)
    assert_ok(first)
    assert "fp8: 14 linear layers of the blocks multiply in float8 (torchao, tensorwise scaling)" in first.stdout
    resumed = launch("python", args, env)
    assert_ok(resumed)
    assert "at step 4 " in resumed.stdout
    train, evals = read_metrics(run)
    assert [r["step"] for r in train] == list(range(1, 9)) and train[-1]["loss"] < train[0]["loss"] and evals
    export = subprocess.run(
        [sys.executable, "-m", "dist_lm", "export", str(run), str(tmp_path / "hf")],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert export.returncode == 0, export.stderr[-3000:]


def test_chunked_cross_entropy_on_the_gpu_gives_the_full_loss():
    """DeepSpeed's Triton kernel (what model.cross_entropy=chunked runs on a GPU) at Llama 3's
    vocabulary, against the full fp32 loss, with the z-loss."""
    from dist_lm.model.loss import language_model_loss
    from dist_lm.runtime.engine import token_cross_entropy

    torch.manual_seed(0)
    logits = (3 * torch.randn(2, 512, 128256, device="cuda")).bfloat16()
    targets = torch.randint(0, 128256, (2, 512), device="cuda")
    results = []
    for rows in (None, token_cross_entropy):
        leaf = logits.clone().requires_grad_()
        loss, _, z = language_model_loss(leaf, targets, 1e-4, rows)
        loss.backward()
        results.append((loss, z, leaf.grad.float()))
    (full, full_z, full_grad), (chunked, chunked_z, chunked_grad) = results
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(chunked_z, full_z)
    torch.testing.assert_close(chunked_grad, full_grad, atol=1e-7, rtol=1e-2)


@pytest.mark.parametrize("precision,stage", [("bf16", 1), ("fp8", 3)])
def test_a_hugging_face_import_trains_and_exports_to_transformers_logits(env, tmp_path, precision, stage):
    """model.init_from on the GPU: a tiny Llama 3 that transformers makes here (tests/hf_models.py)
    is imported, checked against transformers at start-up, trained in bf16 (ZeRO-1) and fp8
    (ZeRO-3), exported; transformers' logits of the export equal ours."""
    import subprocess
    import sys

    from hf_models import VOCAB, make_model, texts
    from transformers import AutoModelForCausalLM

    from conftest import ROOT
    from dist_lm.use.inference import load_model

    source = make_model(tmp_path / "llama", "llama")
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(texts(300)))

    def dist_lm(*args: str) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "dist_lm", *args], env=env, capture_output=True, text=True, cwd=ROOT
        )
        assert proc.returncode == 0, proc.stderr[-3000:]

    dist_lm("prepare", str(text), "--out", str(tmp_path / "data"), "--tokenizer", str(source), "--quiet")
    run = tmp_path / "run"
    env = {**env, "DS_ACCELERATOR": "cuda"}
    proc = launch(
        "python",
        [
            "--config",
            "debug",
            f"model.init_from={source}",
            f"data.dir={tmp_path / 'data'}",
            f"parallel.precision={precision}",
            f"parallel.zero_stage={stage}",
            f"parallel.compile={str(precision == 'fp8').lower()}",  # fp8 runs compiled only
            "train.max_steps=10",
            "train.log_interval=1",
            f"run.dir={run}",
        ],
        env,
    )
    assert_ok(proc)
    assert "our logits on 8 tokens equal transformers" in proc.stdout
    train, _ = read_metrics(run)
    assert len(train) == 10 and train[-1]["loss"] < train[0]["loss"]
    dist_lm("export", str(run), str(tmp_path / "hf"), "--dtype", "fp32")
    ours, _, _ = load_model(run)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=0)


def test_zero_plus_plus_quantized_collectives_train_and_resume_on_one_gpu(env, tmp_path):
    """ZeRO++'s qwZ and qgZ (DeepSpeed's CUDA quantizer kernels; refused on the CPU) at ZeRO-3 in
    bf16 on one GPU: the engine reports both, the losses follow plain ZeRO-3's course within the
    quantization's noise, and a run stopped at step 4 resumes on the uninterrupted run's course.
    hpZ needs a group of two or more ranks (tests/test_engine_launchers.py runs it on CPU)."""
    args = [
        "--config",
        "debug",
        "parallel.zero_stage=3",
        "parallel.precision=bf16",
        "train.max_steps=8",
        "train.log_interval=1",
        "train.eval_interval=0",
    ]
    plus = ["parallel.zero_quantized_weights=true", "parallel.zero_quantized_gradients=true"]
    env = {**env, "DS_ACCELERATOR": "cuda"}
    plain, whole, stopped = tmp_path / "plain", tmp_path / "whole", tmp_path / "stopped"
    assert_ok(launch("python", [*args, f"run.dir={plain}"], env))
    proc = launch("python", [*args, *plus, f"run.dir={whole}"], env)
    assert_ok(proc)
    assert "ZeRO++: qwZ, weights gathered in int8; qgZ, gradients reduced in int4" in proc.stdout
    assert_ok(
        launch("python", [*args, *plus, "checkpoint.interval=4", "train.stop_at_step=4", f"run.dir={stopped}"], env)
    )
    resumed = launch("python", [*args, *plus, f"run.dir={stopped}"], env)
    assert_ok(resumed)
    assert "at step 4 " in resumed.stdout
    reference = {r["step"]: r["loss"] for r in read_metrics(plain)[0]}
    expected = {r["step"]: r["loss"] for r in read_metrics(whole)[0]}
    got = {r["step"]: r["loss"] for r in read_metrics(stopped)[0]}
    print("plain ZeRO-3", reference, "\nqwZ+qgZ", expected, "\nresumed", got)
    assert list(got) == list(expected) == list(reference) == list(range(1, 9))
    assert expected[1] - expected[8] > 0.2
    assert [expected[s] for s in range(1, 9)] == pytest.approx([reference[s] for s in range(1, 9)], abs=5e-2)
    assert [got[s] for s in range(5, 9)] == pytest.approx([expected[s] for s in range(5, 9)], abs=2e-2)


@pytest.mark.parametrize("stage", [1, 3])
def test_async_save_on_the_gpu_stages_while_training_goes_on_and_resumes(env, tmp_path, stage):
    """checkpoint.async_save in bf16 at ZeRO-1 (the GPU default) and ZeRO-3, on CUDA: the step-2
    save is held until step 4's row is logged (tests/hooks/sitecustomize.py), so steps 3 and 4
    train while its files are pending; every checkpoint completes whole; the run stopped at step 5
    resumes on the course of an uninterrupted run that never saved."""
    from dist_lm.store import checkpoints

    args = [
        "--config",
        "debug",
        f"parallel.zero_stage={stage}",
        "parallel.precision=bf16",
        "train.max_steps=8",
        "train.log_interval=1",
        "train.eval_interval=0",
    ]
    env = {**env, "DS_ACCELERATOR": "cuda"}
    plain, stopped = tmp_path / "plain", tmp_path / "stopped"
    assert_ok(launch("python", [*args, "checkpoint.interval=0", f"run.dir={plain}"], env))
    saving = ["checkpoint.async_save=true", "checkpoint.interval=2", "train.stop_at_step=5"]
    assert_ok(launch("python", [*args, *saving, f"run.dir={stopped}"], hooked(env, hold_saves="2=rows:4")))
    root = stopped / "checkpoints"
    step2 = root / "step00000002"
    staged, row3, row4, saved = log_order(
        stopped, f"staged checkpoint {step2}", "step      3 |", "step      4 |", f"saved checkpoint {step2} ("
    )
    assert staged < row3 < row4 < saved
    assert (root / "latest").read_text() == "step00000005"
    assert all(checkpoints.problem_with(p) is None for p in root.iterdir() if checkpoints.step_of(p) is not None)
    resumed = launch("python", [*args, f"run.dir={stopped}"], env)
    assert_ok(resumed)
    assert "at step 5 " in resumed.stdout
    expected = {r["step"]: r["loss"] for r in read_metrics(plain)[0]}
    got = {r["step"]: r["loss"] for r in read_metrics(stopped)[0]}
    print("no saves", expected, "\nasync saves, stopped at 5 and resumed", got)
    assert list(got) == list(expected) == list(range(1, 9))
    assert expected[1] - expected[8] > 0.2
    assert [got[s] for s in range(1, 9)] == pytest.approx([expected[s] for s in range(1, 9)], abs=2e-3)
