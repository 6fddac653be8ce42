"""What a run writes, every tool reads, in the precision GPU runs use: bf16 at ZeRO 0-3 on two
ranks (ZeRO-1 is DeepSpeed's BF16_Optimizer, whose files zero_to_fp32 cannot read), each read on
one rank by evaluate, generate, export (transformers' logits against ours) and list_runs; a
two-rank bf16 ZeRO-1 checkpoint resumed on one rank, whose own checkpoints read the same way;
the ``best`` pointer and --best; bad checkpoints. Muon and MoE checkpoints: test_breadth."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_ok, assert_one_save_as_the_scaling_model_counts, child_env, launch, read_metrics
from dist_lm.store import checkpoints
from dist_lm.train import restore
from dist_lm.use.export import export_hf
from dist_lm.use.inference import load_model

BF16 = [
    "--config",
    "debug",
    "parallel.precision=bf16",
    "train.max_steps=4",
    "train.log_interval=2",
    "train.eval_interval=2",
    "train.eval_samples=16",
    "checkpoint.interval=2",
    "logging.wandb=disabled",
]
MEMORY_LINES = ("begin bf16_optimizer", "CPU Virtual Memory")  # DeepSpeed's bare prints at bf16 ZeRO-1
STAGES = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory, cache_dir, ds_ops) -> dict[int, tuple[Path, subprocess.CompletedProcess]]:
    """One two-rank bf16 run per ZeRO stage, checkpoints at steps 2 and 4, each after an evaluation.
    ZeRO-1's run is --verbose (DeepSpeed's start-up output shown)."""
    env, root = child_env(cache_dir), tmp_path_factory.mktemp("lifecycle")
    runs = {}
    for stage in STAGES:
        run = root / f"zero{stage}"
        verbose = ["--verbose"] if stage == 1 else []
        proc = launch("torchrun", [*BF16, f"parallel.zero_stage={stage}", f"run.dir={run}", *verbose], env)
        assert_ok(proc)
        runs[stage] = run, proc
    return runs


def tool(name: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / name), *map(str, args)], env=env, capture_output=True, text=True, cwd=ROOT
    )


def deepspeeds_own_weights(ckpt: Path, stage: int) -> tuple[dict[str, torch.Tensor], bool]:
    """What DeepSpeed itself says the weights are, and whether that is the fp32 masters (else the
    module's bf16 weights): zero_to_fp32 where it reads the files (ZeRO 2-3), its universal format
    for BF16_Optimizer's (ZeRO-1), the saved module at ZeRO-0."""
    if stage == 0:
        module = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        return dict(module), False
    legacy = ckpt.parent.parent / f"legacy-{ckpt.name}"  # the checkpoint as written before weights files
    shutil.copytree(ckpt, legacy, ignore=shutil.ignore_patterns(checkpoints.WEIGHTS_GLOB))
    return restore.consolidated_weights(legacy), True


@pytest.mark.parametrize("stage", STAGES)
def test_bf16_checkpoints_hold_the_fp32_masters(bf16_runs, stage):
    run, _ = bf16_runs[stage]
    ckpt = run / "checkpoints" / "step00000004"
    ours = restore.consolidated_weights(ckpt)
    theirs, masters = deepspeeds_own_weights(ckpt, stage)
    assert sorted(theirs) == sorted(ours) and all(v.dtype == torch.float32 for v in ours.values())
    for name, value in theirs.items():
        if masters:
            assert torch.equal(ours[name], value), name
        else:  # the module is the masters rounded to bf16
            assert value.dtype == torch.bfloat16 and torch.equal(ours[name].bfloat16(), value), name
    assert len(list(ckpt.glob(checkpoints.WEIGHTS_GLOB))) == 2  # a share per rank
    assert_one_save_as_the_scaling_model_counts(ckpt)


@pytest.mark.parametrize("stage", STAGES)
def test_bf16_state_json_reads_back_through_run_state(bf16_runs, stage):
    from dist_lm.store.state import VERSION, RunState

    run, _ = bf16_runs[stage]
    state = RunState.read(run / "checkpoints" / "step00000004")
    assert (state.version, state.step, state.precision, state.zero_stage, state.world_size) == (
        VERSION,
        4,
        "bf16",
        stage,
        2,
    )
    assert state.log_window["steps"] == 0 and len(state.log_window["loss_sums"]) == 2  # a sum per rank
    assert state.val_loss is not None and state.manifest and all(size > 0 for size in state.manifest.values())


@pytest.mark.parametrize("stage", STAGES)
def test_evaluate_and_generate_read_a_two_rank_bf16_checkpoint(bf16_runs, cache_dir, stage):
    run, proc = bf16_runs[stage]
    env = child_env(cache_dir)
    val = {r["step"]: r["val_loss"] for r in read_metrics(run)[1]}
    result = tool(
        "evaluate.py", run / "checkpoints" / "step00000002", "--samples", "16", "--micro-batch", "4", "--json", env=env
    )
    assert result.returncode == 0, result.stderr
    # the training loop's own loss on the same windows: the same bf16 weights, the same forward
    assert json.loads(result.stdout.splitlines()[-1])["loss"] == pytest.approx(val[2], abs=1e-5)
    best = min(val, key=val.get)
    assert (run / "checkpoints" / "best").read_text() == f"step{best:08d}"
    sample = tool("generate.py", run, "--best", "--prompt", "The", "--max-tokens", "8", "--temperature", "0", env=env)
    assert sample.returncode == 0 and sample.stdout.startswith("The"), sample.stderr
    # Quiet by default: at ZeRO-1 (BF16_Optimizer) DeepSpeed prints memory lines, shown only with --verbose
    shown = [line in proc.stdout for line in MEMORY_LINES]
    assert shown == [stage == 1] * len(MEMORY_LINES) and not any(line in proc.stderr for line in MEMORY_LINES)


@pytest.mark.parametrize("stage", STAGES)
def test_transformers_reads_the_bf16_export_with_our_logits(bf16_runs, cache_dir, stage, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("DIST_LM_CACHE", str(cache_dir))  # where the run's tokenizer is
    run, _ = bf16_runs[stage]
    export_hf(run, tmp_path / "hf")  # the run's precision: bf16 weights, the masters rounded
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ours, _, _ = load_model(run, dtype="trained")
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert torch.equal(exported["model.layers.0.self_attn.q_proj.weight"], ours.blocks[0].attn.wq.weight)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # bf16 weights compared as bf16, computed in fp32 on both sides
        assert torch.allclose(hf(ids).logits, ours.float()(ids), atol=1e-4, rtol=0)


def test_a_two_rank_bf16_zero1_checkpoint_resumes_on_one_rank_and_its_checkpoints_read(bf16_runs, cache_dir, tmp_path):
    run, _ = bf16_runs[1]
    env = child_env(cache_dir)
    proc = launch(
        "python",
        [
            *BF16,
            "parallel.zero_stage=1",
            "train.max_steps=6",
            f"run.dir={tmp_path}",
            "--resume",
            str(run / "checkpoints" / "step00000004"),
        ],
        env,
    )
    assert_ok(proc)
    assert "universal format (saved on 2 ranks" in proc.stdout
    assert not any(line in proc.stdout + proc.stderr for line in MEMORY_LINES)  # BF16_Optimizer, not --verbose
    listed = tool("list_runs.py", tmp_path, "--json", env=env)
    rows = {r["checkpoint"]: r for r in map(json.loads, listed.stdout.splitlines())}
    assert rows["step00000006"]["latest"] and rows["step00000006"]["precision"] == "bf16"
    assert rows["step00000006"]["world_size"] == 1
    weights = restore.consolidated_weights(tmp_path / "checkpoints" / "step00000006")
    module = torch.load(tmp_path / "checkpoints" / "step00000006" / "mp_rank_00_model_states.pt", weights_only=False)[
        "module"
    ]
    assert all(torch.equal(weights[k].bfloat16(), v) for k, v in module.items())


def test_bad_checkpoints_get_one_line_and_status_2(bf16_runs, cache_dir, tmp_path):
    env = child_env(cache_dir)
    run, _ = bf16_runs[2]
    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    cases = {"is not a checkpoint, a run directory or a checkpoint root": [not_a_checkpoint]}
    truncated, missing = (tmp_path / name / "checkpoints" for name in ("truncated", "missing"))
    for root in (truncated, missing):
        shutil.copytree(run / "checkpoints" / "step00000004", root / "step00000004")
    shard = truncated / "step00000004" / "weights-rank00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    cases["weights-rank00001.safetensors has 100 bytes"] = [truncated / "step00000004"]
    (missing / "step00000004" / "mp_rank_00_model_states.pt").unlink()
    cases["no complete checkpoint in"] = [missing.parent]
    no_eval = tmp_path / "no-eval"
    shutil.copytree(run / "checkpoints" / "step00000004", no_eval / "checkpoints" / "step00000004")
    cases["has no best pointer"] = [no_eval, "--best"]
    # The cases share one reader (checkpoints.find_for_reading), so each tool takes a turn.
    for (message, args), name in zip(cases.items(), ["evaluate.py", "generate.py", "export_hf.py", "evaluate.py"]):
        extra = [tmp_path / "out"] if name == "export_hf.py" else []
        proc = tool(name, args[0], *extra, *args[1:], env=env)
        assert proc.returncode == 2 and message in proc.stderr, (name, args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def autocast_run(tmp_path_factory, cache_dir, ds_ops) -> Path:
    """A two-rank bf16-autocast run (fp32 weights, forward under torch.autocast, ZeRO-0: the
    planner's choice for one GPU), checkpoints at steps 2 and 4, each after an evaluation."""
    run = tmp_path_factory.mktemp("autocast") / "run"
    assert_ok(
        launch(
            "torchrun",
            [*BF16, "parallel.precision=bf16-autocast", "parallel.zero_stage=0", f"run.dir={run}"],
            child_env(cache_dir),
        )
    )
    return run


def test_a_bf16_autocast_checkpoint_is_fp32_and_every_tool_runs_it_as_it_trained(autocast_run, cache_dir, tmp_path):
    env = child_env(cache_dir)
    ckpt = autocast_run / "checkpoints" / "step00000002"
    state = json.loads((ckpt / "state.json").read_text())
    assert (state["precision"], state["zero_stage"], state["world_size"]) == ("bf16-autocast", 0, 2)
    weights = restore.consolidated_weights(ckpt)
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert sorted(module) == sorted(weights)
    assert all(v.dtype == torch.float32 and torch.equal(weights[k], v) for k, v in module.items())
    # evaluate runs it under autocast as the training loop did: the same loss; in plain fp32 not
    val = {r["step"]: r["val_loss"] for r in read_metrics(autocast_run)[1]}
    losses = {}
    for dtype in ("trained", "fp32"):
        result = tool("evaluate.py", ckpt, "--samples", "16", "--micro-batch", "4", "--dtype", dtype, "--json", env=env)
        assert result.returncode == 0, result.stderr
        losses[dtype] = json.loads(result.stdout.splitlines()[-1])["loss"]
    assert losses["trained"] == pytest.approx(val[2], abs=1e-6) and abs(losses["fp32"] - val[2]) > 1e-5, (losses, val)
    sample = tool("generate.py", autocast_run, "--prompt", "The", "--max-tokens", "8", "--temperature", "0", env=env)
    assert sample.returncode == 0 and sample.stdout.startswith("The"), sample.stderr
    exported = tool("export_hf.py", autocast_run, tmp_path / "hf", env=env)
    assert exported.returncode == 0, exported.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "float32"


def test_the_auto_plan_reads_the_precision_and_stage_of_the_checkpoint_it_resumes(autocast_run, bf16_runs, tmp_path):
    """What dist_lm.plan.planner.make_plan keeps for a resumed run (tested there) comes from the
    checkpoint the run's own overrides lead to: run.dir, run.name, checkpoint.dir or --resume."""
    from dist_lm.runtime.precision import Precision

    resumed_settings = restore.resumed_settings
    autocast = (Precision.BF16_AUTOCAST, 0)
    assert resumed_settings([f"run.dir={autocast_run}"]) == autocast
    assert resumed_settings([f"checkpoint.dir={autocast_run / 'checkpoints'}", "run.name=other"]) == autocast
    assert resumed_settings([f"checkpoint.resume={autocast_run / 'checkpoints' / 'step00000002'}"]) == autocast
    for stage in STAGES:
        assert resumed_settings([f"run.dir={bf16_runs[stage][0]}"]) == (Precision.BF16, stage)
    assert resumed_settings([f"run.dir={autocast_run}", "checkpoint.resume=none"]) is None
    assert resumed_settings([f"run.dir={tmp_path / 'new'}"]) is None  # a fresh run directory
    assert resumed_settings(["train.max_steps=6"]) is None  # unnamed: a new, timestamped directory
    with pytest.raises(checkpoints.CheckpointError, match="does not exist"):
        resumed_settings([f"checkpoint.resume={tmp_path / 'missing'}"])


def test_a_bf16_autocast_checkpoint_resumes_on_one_rank_by_the_auto_plan_but_not_in_bf16(
    autocast_run, bf16_runs, cache_dir, tmp_path
):
    env = child_env(cache_dir)
    bf16_zero0, _ = bf16_runs[0]  # and the other way round
    proc = launch(
        "python",
        [
            *BF16,
            "parallel.precision=bf16-autocast",
            "parallel.zero_stage=0",
            "train.max_steps=6",
            "--resume",
            str(bf16_zero0 / "checkpoints" / "step00000004"),
            f"run.dir={tmp_path / 'x'}",
        ],
        env,
    )
    assert (
        proc.returncode == 2 and "saved in parallel.precision=bf16 and this run trains in bf16-autocast" in proc.stderr
    )
    assert "resume with parallel.precision=bf16 parallel.zero_stage=0" in proc.stderr, proc.stderr
    source = str(autocast_run / "checkpoints" / "step00000004")
    common = [*BF16, "parallel.zero_stage=0", "train.max_steps=6", "--resume", source]
    refused = launch("python", [*common, f"run.dir={tmp_path / 'bf16'}"], env)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "saved in parallel.precision=bf16-autocast and this run trains in bf16" in refused.stderr
    assert (
        "resume with parallel.precision=bf16-autocast parallel.zero_stage=0" in refused.stderr
        and not (tmp_path / "bf16").exists()
    )
    # The auto plan (no --config; on this CPU machine the debug preset in fp32 at ZeRO-1) keeps the
    # checkpoint's bf16-autocast at ZeRO-0, where its state loads, and says so.
    auto = [a for a in common if a not in ("--config", "debug", "parallel.precision=bf16", "parallel.zero_stage=0")]
    proc = launch("python", [*auto, f"run.dir={tmp_path / 'one'}"], env)
    assert_ok(proc)
    assert (
        "kept from the checkpoint it resumes, whose state loads only so: parallel.precision=bf16-autocast "
        "parallel.zero_stage=0" in proc.stdout
    ), proc.stdout
    losses = [r["loss"] for r in read_metrics(tmp_path / "one")[0]]
    assert len(losses) == 1 and math.isfinite(losses[0])  # the row of steps 5-6
    state = json.loads((tmp_path / "one" / "checkpoints" / "step00000006" / "state.json").read_text())
    assert (state["step"], state["world_size"], state["precision"]) == (6, 1, "bf16-autocast")
    # fp32 shares bf16-autocast's weights and optimizer state: it loads, and the run says it
    # trains on in another precision than it began in (as a resumed fp8 run does in bf16)
    proc = launch("python", [*common, "parallel.precision=fp32", f"run.dir={tmp_path / 'fp32'}"], env)
    assert_ok(proc)
    assert (
        "warning: the checkpoint was saved in parallel.precision=bf16-autocast; this run goes on in fp32 "
        "(parallel.precision); to keep training as it began, resume with parallel.precision=bf16-autocast"
        in proc.stderr
    ), proc.stderr
    state = json.loads((tmp_path / "fp32" / "checkpoints" / "step00000006" / "state.json").read_text())
    assert (state["step"], state["precision"]) == (6, "fp32")


# ---------------------------- checkpoints from elsewhere: content checked, nothing unpickled
@pytest.mark.parametrize("stage", STAGES)
def test_a_damaged_bf16_checkpoint_is_passed_over_and_the_previous_resumes_weights_only(
    bf16_runs, cache_dir, tmp_path, stage
):
    """At every ZeRO stage in bf16 on two ranks: 4 KiB changed in the middle of the newest
    checkpoint's largest DeepSpeed file (same size) fails its checksum; the resume warns once and
    continues from the previous checkpoint, read through torch's weights-only unpickler (every
    training process imposes it), on the same samples the uninterrupted run trained."""
    run, _ = bf16_runs[stage]
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    step4 = copy / "checkpoints" / "step00000004"
    largest = max((p for p in step4.glob("*.pt")), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)
    largest.write_bytes(bytes(data))
    proc = launch(
        "torchrun",
        [*BF16, f"parallel.zero_stage={stage}", "train.max_steps=4", f"run.dir={copy}"],
        child_env(cache_dir),
    )
    assert_ok(proc)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: step00000004 is damaged ({largest.name} does not match the checksum recorded when "
        "it was saved: it changed or is damaged); resuming from step00000002, the newest complete checkpoint"
    ]
    assert f"resumed from {copy / 'checkpoints' / 'step00000002'} at step 2" in proc.stdout
    expected = {r["step"]: r["loss"] for r in read_metrics(run)[0]}
    assert {r["step"]: r["loss"] for r in read_metrics(copy)[0]} == pytest.approx(expected, abs=1e-6)


class Payload:
    """Unpickling this runs `touch MARKER`: what a crafted checkpoint file can hold."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def plant(ckpt: Path, marker: Path, legacy: bool) -> None:
    """Add the payload to ckpt's model states file and make the manifest agree (sizes and
    checksums are the attacker's to write too); ``legacy``: drop the weights files, so that the
    tools read DeepSpeed's files as for a checkpoint from before them."""
    from dist_lm.files import checksum

    f = ckpt / "mp_rank_00_model_states.pt"
    states = torch.load(f, weights_only=False)
    states["payload"] = Payload(marker)
    torch.save(states, f)
    state = json.loads((ckpt / "state.json").read_text())
    state["manifest"][f.name], state["checksums"][f.name] = f.stat().st_size, checksum(f)
    for weights in ckpt.glob(checkpoints.WEIGHTS_GLOB) if legacy else []:
        weights.unlink()
        del state["manifest"][weights.name], state["checksums"][weights.name]
    (ckpt / "state.json").write_text(json.dumps(state))


def test_a_checkpoint_that_would_run_code_is_refused_by_every_command(bf16_runs, cache_dir, tmp_path):
    """A crafted .pt ran its payload under export, evaluate, generate and train --resume (DeepSpeed's
    loader and ours unpickled in full). Now no command makes the marker: each refuses in one line
    naming the file and --trust-checkpoint, or (the tools, with weights files) never reads the
    pickle at all. With --trust-checkpoint the legacy read does unpickle: the flag is the gate."""
    env, marker = child_env(cache_dir), tmp_path / "marker"
    for stage in (0, 2):
        legacy = tmp_path / f"legacy{stage}"
        shutil.copytree(bf16_runs[stage][0] / "checkpoints" / "step00000004", legacy / "step00000004")
        plant(legacy / "step00000004", marker, legacy=True)
        for name, extra in [("export_hf.py", [tmp_path / "out"]), ("evaluate.py", []), ("generate.py", [])]:
            proc = tool(name, legacy, *extra, env=env)
            lines = proc.stderr.strip().splitlines()
            assert (
                proc.returncode == 2
                and len(lines) == 1
                and "mp_rank_00_model_states.pt holds an object of type posix.system, which dist-lm does not unpickle"
                in lines[0]
                and "--trust-checkpoint" in lines[0]
            ), (stage, name, proc.stderr)
    current = tmp_path / "current"
    shutil.copytree(bf16_runs[1][0] / "checkpoints" / "step00000004", current / "step00000004")
    plant(current / "step00000004", marker, legacy=False)
    assert_ok(tool("evaluate.py", current, env=env))  # the weights files: safetensors, no pickle read
    proc = launch(
        "python",
        [
            *BF16,
            "parallel.zero_stage=1",
            "train.max_steps=6",
            f"run.dir={tmp_path / 'resumed'}",
            "--resume",
            str(current / "step00000004"),
        ],
        env,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "holds an object of type posix.system" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "resumed").exists()
    assert not marker.exists()
    assert_ok(tool("export_hf.py", tmp_path / "legacy0", tmp_path / "out", "--trust-checkpoint", env=env))
    assert marker.exists()
