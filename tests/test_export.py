"""Export to Hugging Face: a tiny model trained with ZeRO-2 on two ranks, exported, loaded by
transformers on CPU: the same logits (1e-4 in fp32) and the same greedy continuation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_ok, child_env, launch
from dist_lm.use.export import export_hf
from dist_lm.use.generate import sample
from dist_lm.use.inference import load_model

TOOL = ROOT / "tools" / "export_hf.py"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir, ds_ops):
    run = tmp_path_factory.mktemp("export") / "run"
    e = child_env(cache_dir)
    assert_ok(
        launch(
            "torchrun",
            [
                "--config",
                "debug",
                "parallel.zero_stage=2",
                "train.max_steps=20",
                "train.eval_interval=0",
                "logging.wandb=disabled",
                f"run.dir={run}",
            ],
            e,
        )
    )
    return run, e


def test_transformers_loads_the_export_with_the_same_logits_and_greedy_tokens(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, env = trained
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, str(TOOL), str(run), str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "reference_logits.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    ours, cfg, _ = load_model(run)
    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The function returns a new object", return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 3
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-4, rtol=0)
        hf_tokens = hf.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)[
            0, ids.shape[1] :
        ].tolist()
    assert hf_tokens == sample(ours, ids[0].tolist(), 20, cfg.model.seq_len, torch.device("cpu"), temperature=0)


def test_an_import_of_the_export_checks_itself_against_its_reference_logits(trained, tmp_path, monkeypatch):
    """Where transformers is not installed, model.init_from holds our forward to the logits the
    export saved beside its weights; other logits there are refused."""
    from safetensors.torch import load_file, save_file

    from dist_lm.config.io import load_config
    from dist_lm.config.schema import UserError
    from dist_lm.model.transformer import Transformer
    from dist_lm.store import hugging_face

    run, _ = trained
    out = tmp_path / "hf"
    export_hf(run, out)
    monkeypatch.setitem(sys.modules, "transformers", None)  # an import of it raises ImportError
    model = Transformer(load_config("debug", [f"model.init_from={out}"]).model)
    hugging_face.load_into(model, out)
    assert "reference_logits.safetensors" in hugging_face.check_logits(model, out)
    saved = load_file(out / hugging_face.REFERENCE_LOGITS)
    save_file({**saved, "logits": saved["logits"] + 0.01}, out / hugging_face.REFERENCE_LOGITS)
    with pytest.raises(UserError, match="differs from .*reference_logits.safetensors's logits"):
        hugging_face.check_logits(model, out)
    (out / hugging_face.REFERENCE_LOGITS).unlink()
    assert hugging_face.check_logits(model, out) is None  # nothing to check against: the run warns


def test_export_refuses_what_llama_cannot_express(trained, tmp_path):
    run, env = trained
    state_path = next((run / "checkpoints").glob("step*/state.json"))
    state = json.loads(state_path.read_text())
    geglu = tmp_path / "geglu" / "checkpoints" / "step00000020"
    geglu.mkdir(parents=True)
    for f in state_path.parent.iterdir():
        if f.name != "state.json":
            (geglu / f.name).symlink_to(f)
    state["config"]["model"]["activation"] = "geglu"
    (geglu / "state.json").write_text(json.dumps(state))
    proc = subprocess.run(
        [sys.executable, str(TOOL), str(geglu), str(tmp_path / "out")], env=env, capture_output=True, text=True
    )
    assert (
        proc.returncode == 2
        and "model.activation=geglu (Llama's MLP is SwiGLU): no LlamaForCausalLM equivalent" in proc.stderr
    )
    assert not (tmp_path / "out").exists()


def test_export_keeps_an_existing_directory(trained, tmp_path):
    run, env = trained
    (tmp_path / "out").mkdir()
    proc = subprocess.run(
        [sys.executable, str(TOOL), str(run), str(tmp_path / "out")], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "exists; choose another directory or pass --overwrite" in proc.stderr


def test_overwrite_replaces_an_earlier_export_and_nothing_else(trained, tmp_path):
    """`export RUN RUN --overwrite` deleted the whole run, checkpoints and logs; `export runs/run1
    runs --overwrite` deleted the sibling run too. --overwrite replaces only an earlier export."""
    run, env = trained
    sibling = run.parent / "sibling"
    sibling.mkdir(exist_ok=True)
    (sibling / "keep").write_text("x")
    before = {p: p.stat().st_size for p in run.parent.rglob("*") if p.is_file()}

    def export(out, *extra):
        return subprocess.run(
            [sys.executable, str(TOOL), str(run), str(out), "--overwrite", *extra],
            env=env,
            capture_output=True,
            text=True,
        )

    for out, message in [
        (run, "holds the checkpoint being exported"),
        (run.parent, "holds the checkpoint being exported"),
        (run / "checkpoints" / "step00000020" / "hf", "is inside the checkpoint"),
        (sibling, "holds keep, which an export does not write"),
    ]:
        proc = export(out)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (out, proc.stderr)
    assert {p: p.stat().st_size for p in run.parent.rglob("*") if p.is_file()} == before
    out = tmp_path / "hf"
    assert_ok(export(out))
    assert_ok(export(out, "--dtype", "bf16"))  # an earlier export is replaced
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left beside it


def test_an_export_is_readable_by_others_as_the_umask_says(trained, tmp_path):
    """The export directory was drwx------ and model.safetensors -rw-------: under umask 022 they are
    0755 and 0644, as mkdir and open make them; so are the checkpoint's weights files."""
    run, env = trained
    out = tmp_path / "hf"
    proc = subprocess.run(
        [sys.executable, str(TOOL), str(run), str(out)],
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.umask(0o022),
    )
    assert_ok(proc)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: 0o644 for p in out.iterdir()}
    weights = sorted((run / "checkpoints").glob("step*/weights-rank*.safetensors"))
    assert weights and all(p.stat().st_mode & 0o077 == 0o044 for p in weights)
