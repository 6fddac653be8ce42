"""Continued pretraining from a Hugging Face directory (model.init_from), on tiny random models
that transformers makes here (tests/hf_models.py): the architecture from config.json, our
logits equal to transformers', the model's tokenizer in `dist-lm prepare`, the refusals, and
the whole path on two ranks in bf16: import, save at step 0 and export bitwise, train at ZeRO-1,
stop, resume at ZeRO-3 without the Hugging Face weights, export, and transformers' logits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_models import VOCAB, make_model, texts

from conftest import ROOT, assert_ok, child_env, launch, read_metrics
from dist_lm.config.errors import ConfigError, UserError
from dist_lm.config.io import load_config
from dist_lm.model.transformer import Transformer
from dist_lm.store import hugging_face

KINDS = ["llama", "qwen3", "mistral"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A directory per kind: Llama and Mistral in fp32, Qwen3 in bf16 and in shards with an index."""
    root = tmp_path_factory.mktemp("hf")
    return {
        "llama": make_model(root / "llama", "llama"),
        "qwen3": make_model(root / "qwen3", "qwen3", torch.bfloat16, shards="40KB"),
        "mistral": make_model(root / "mistral", "mistral"),
    }


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    """400 documents of text."""
    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(400)))
    return path


@pytest.fixture(scope="module")
def chat_file(corpus_file) -> Path:
    """The same and a chat after them (line 401)."""
    path = corpus_file.with_name("chat.jsonl")
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path.write_text(corpus_file.read_text() + json.dumps(chat) + "\n")
    return path


def prepare(inputs: Path, out: Path, tokenizer: Path, workers: int = 1) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dist_lm", "prepare", str(inputs), "--out", str(out), "--tokenizer", str(tokenizer)]
    return subprocess.run([*cmd, "--quiet", f"--workers={workers}"], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def qwen_data(models, chat_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "qwen3"
    assert_ok(prepare(chat_file, out, models["qwen3"]))
    return out


def imported(directory: Path) -> Transformer:
    cfg = load_config("debug", [f"model.init_from={directory}"])
    model = Transformer(cfg.model)
    hugging_face.load_into(model, directory)
    return model.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_our_forward_of_an_import_gives_transformers_logits(models, kind):
    from transformers import AutoModelForCausalLM

    ours = imported(models[kind])
    hf = AutoModelForCausalLM.from_pretrained(models[kind], dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)
    assert "equal transformers" in hugging_face.check_logits(ours, models[kind])


def test_the_architecture_comes_from_config_json(models, tmp_path):
    llama = load_config("debug", [f"model.init_from={models['llama']}"]).model
    assert (llama.d_model, llama.n_layers, llama.n_heads, llama.kv_heads, llama.ffn_dim) == (64, 2, 4, 2, 160)
    assert (llama.vocab_size, llama.rope_theta, llama.rope_scaling, llama.rope_scaling_original_seq_len) == (
        VOCAB,
        500000.0,
        "llama3",
        32,
    )
    assert llama.head_dim is None and not llama.tie_embeddings and not llama.qk_norm
    qwen = load_config("debug", [f"model.init_from={models['qwen3']}"]).model
    assert (qwen.head_dim, qwen.attention_width, qwen.qk_norm, qwen.tie_embeddings, qwen.norm_eps) == (
        32,
        128,
        True,
        True,
        1e-6,
    )
    # The debug preset's model keys give way; the user's own must agree, or one line names both values.
    assert load_config(None, [f"model.init_from={models['llama']}", "model.d_model=64"]).model.d_model == 64
    with pytest.raises(ConfigError, match=r"model.d_model: is 128 here but .*config.json says 64"):
        load_config("debug", [f"model.init_from={models['llama']}", "model.d_model=128"])
    own = tmp_path / "mine.yaml"
    own.write_text(f"model:\n  init_from: {models['qwen3']}\n  qk_norm: false\n")
    with pytest.raises(ConfigError, match=rf"{own}: model.qk_norm: is False here but .* says True"):
        load_config(str(own))


@pytest.mark.parametrize(
    "kind, change, named",
    [
        ("mistral", {"architectures": ["MixtralForCausalLM"], "num_local_experts": 8}, "mixture-of-experts"),
        ("mistral", {"sliding_window": 4096}, "sliding-window attention (sliding_window=4096)"),
        ("llama", {"attention_bias": True}, "attention_bias=true"),
        ("llama", {"architectures": ["Gemma2ForCausalLM"]}, "Gemma's norms"),
        ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type=yarn"),
        ("qwen3", {"use_sliding_window": True, "sliding_window": 256}, "sliding-window attention"),
        ("llama", {"hidden_act": "gelu"}, "hidden_act=gelu"),
    ],
)
def test_an_architecture_we_do_not_implement_is_refused_by_name(models, tmp_path, kind, change, named):
    directory = tmp_path / kind
    directory.mkdir()
    config = json.loads((models[kind] / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConfigError, match="dist-lm does not implement") as refused:
        load_config("debug", [f"model.init_from={directory}"])
    assert named in str(refused.value)


def test_a_damaged_directory_is_refused_naming_the_file(models, tmp_path):
    cfg = load_config("debug", [f"model.init_from={models['qwen3']}"]).model
    damaged = shutil.copytree(models["qwen3"], tmp_path / "qwen3")
    shards = sorted(damaged.glob("model-*.safetensors"))
    shards[3].write_bytes(shards[3].read_bytes()[:-100])  # truncated
    with pytest.raises(UserError, match=rf"{shards[3]} is not a whole safetensors file"):
        hugging_face.read_weights(damaged, cfg)
    shards[3].unlink()  # missing
    with pytest.raises(UserError, match=rf"lacks {shards[3].name}, a shard its model.safetensors.index.json lists"):
        hugging_face.read_weights(damaged, cfg)
    single = make_model(tmp_path / "llama", "llama")
    other = load_config("debug", [f"model.init_from={models['mistral']}"]).model
    assert hugging_face.read_weights(single, other)  # same names and shapes: only the logits tell them apart
    torch_file = single / "model.safetensors"
    torch_file.rename(single / "pytorch_model.bin")
    with pytest.raises(UserError, match="pytorch_model.bin are pickles, which dist-lm does not load"):
        hugging_face.read_weights(single, other)


def test_prepare_takes_the_model_directory_and_its_document_tokens(models, corpus_file, chat_file, qwen_data, tmp_path):
    from tokenizers import Tokenizer

    # The model's tokenizer.json, byte for byte: the run checks its data by this hash.
    assert (qwen_data / "tokenizer.json").read_bytes() == (models["qwen3"] / "tokenizer.json").read_bytes()
    meta = json.loads((qwen_data / "meta.json").read_text())
    qwen = Tokenizer.from_file(str(models["qwen3"] / "tokenizer.json"))
    assert (meta["eot_id"], meta["bos_id"]) == (qwen.token_to_id("<|endoftext|>"), None)
    tokens = np.fromfile(qwen_data / "train_0000.bin", dtype=np.uint16)
    assert qwen.token_to_id("<|im_start|>") in tokens  # the chat, by the model's chat template
    assert tokens[-1] == meta["eot_id"]

    out = tmp_path / "llama-data"
    assert_ok(prepare(corpus_file, out, models["llama"], workers=2))
    meta = json.loads((out / "meta.json").read_text())
    llama = Tokenizer.from_file(str(models["llama"] / "tokenizer.json"))
    bos, eos = llama.token_to_id("<|begin_of_text|>"), llama.token_to_id("<|end_of_text|>")
    assert (meta["bos_id"], meta["eot_id"], meta["eos_token"]) == (bos, eos, "<|end_of_text|>")
    tokens = np.fromfile(out / "train_0000.bin", dtype=np.uint16)
    ends = np.flatnonzero(tokens == eos)
    assert tokens[0] == bos and len(ends) > 300 and (tokens[ends[:-1] + 1] == bos).all()  # BOS text EOS, each

    refused = prepare(chat_file, tmp_path / "chat", models["llama"], workers=2)  # no chat template to render
    assert refused.returncode == 2 and not (tmp_path / "chat").exists()
    assert refused.stderr.strip().splitlines() == [
        f"error: data error: {chat_file} line 401: a 'messages' chat, but {models['llama']} has no chat template "
        "(tokenizer_config.json chat_template); give the text in a text field"
    ]


def bad_start(env, args: list[str], run_dir: Path) -> str:
    proc = launch("python", ["--config", "debug", *args, f"run.dir={run_dir}"], env)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert not run_dir.exists()  # refused before anything was written
    return lines[0]


def test_a_continued_run_refuses_other_data_keys_and_damaged_weights(models, qwen_data, env, tmp_path):
    run = tmp_path / "run"
    line = bad_start(env, [f"model.init_from={models['llama']}", f"data.dir={qwen_data}"], run)
    assert f"{qwen_data} was made with tokenizer" in line and f"--tokenizer {models['llama']}" in line
    line = bad_start(env, [f"model.init_from={models['llama']}"], run)  # the embedded corpus: our own BPE
    assert "not the model's" in line
    line = bad_start(env, [f"model.init_from={models['qwen3']}", f"data.dir={qwen_data}", "model.n_layers=3"], run)
    assert "model.n_layers: is 3 here but" in line
    damaged = shutil.copytree(models["qwen3"], tmp_path / "damaged")
    shard = sorted(damaged.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-64])
    line = bad_start(env, [f"model.init_from={damaged}", f"data.dir={qwen_data}"], run)
    assert f"{shard} is not a whole safetensors file" in line


def safetensors_of(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        if path.name != hugging_face.REFERENCE_LOGITS:
            tensors |= load_file(path)
    return tensors


@pytest.mark.parametrize("kind, stage, first_stop", [("qwen3", 1, 0), ("llama", 3, 1)])
def test_import_train_stop_resume_export_on_two_ranks_in_bf16(
    models, corpus_file, cache_dir, ds_ops, tmp_path, kind, stage, first_stop
):
    """Import on two ranks in bf16 and stop (Qwen3 at ZeRO-1 before any step: its export is the
    original, bitwise; Llama at ZeRO-3 after one), resume with the Hugging Face weights deleted
    (a continued run resumes from its own checkpoints only), train to step 3, export: transformers'
    logits of the export equal ours."""
    from transformers import AutoModelForCausalLM

    from dist_lm.use.export import export_hf
    from dist_lm.use.inference import load_model

    env = child_env(cache_dir)
    source = shutil.copytree(models[kind], tmp_path / kind)  # its weights go away before the resume
    data = tmp_path / "data"
    assert_ok(prepare(corpus_file, data, source))
    run = tmp_path / "run"
    common = [
        "--config",
        "debug",
        f"model.init_from={source}",
        f"data.dir={data}",
        "parallel.precision=bf16",
        f"parallel.zero_stage={stage}",
        "train.max_steps=3",
        "train.log_interval=1",
        "train.eval_interval=0",
        f"run.dir={run}",
    ]
    proc = launch("torchrun", [*common, f"train.stop_at_step={first_stop}"], env)
    assert_ok(proc)
    assert "our logits on 8 tokens equal transformers" in proc.stdout
    assert json.loads((run / "run.json").read_text())["init_from"] == str(source)
    original = safetensors_of(source)
    if first_stop == 0:
        export_hf(run, tmp_path / "step0", dtype="bf16")
        exported = safetensors_of(tmp_path / "step0")
        assert original.keys() == exported.keys()
        assert all(exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], original[k]) for k in original)

    for weights in source.glob("model*.safetensors"):
        weights.unlink()
    proc = launch("torchrun", common, env)
    assert_ok(proc)
    assert "started from the weights" not in proc.stdout
    train, _ = read_metrics(run)
    assert [r["step"] for r in train] == list(range(1, 4)) and all(np.isfinite(r["loss"]) for r in train)
    listed = subprocess.run(
        [sys.executable, "-m", "dist_lm", "runs", str(run)], capture_output=True, text=True, cwd=ROOT
    )
    assert_ok(listed)
    assert str(source) in listed.stdout

    export_hf(run, tmp_path / "step3", dtype="fp32")
    ours, _, _ = load_model(run)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "step3", dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=0)
    trained = safetensors_of(tmp_path / "step3")["model.embed_tokens.weight"]
    assert not torch.equal(trained, original["model.embed_tokens.weight"].float())  # training moved them


@pytest.mark.parametrize("precision, stage", [("bf16", 0), ("bf16", 2), ("fp32", 3)])
def test_an_import_saved_before_any_step_exports_the_original_at_every_stage(
    models, qwen_data, cache_dir, ds_ops, tmp_path, precision, stage
):
    """The stages and precision the test above leaves out: the bf16 Qwen3 imported on two ranks
    and saved at step 0 exports its own tensors (bf16: bitwise; an fp32 run's masters: exactly
    their upcast)."""
    from dist_lm.use.export import export_hf

    run = tmp_path / "run"
    args = [
        "--config",
        "debug",
        f"model.init_from={models['qwen3']}",
        f"data.dir={qwen_data}",
        f"parallel.precision={precision}",
        f"parallel.zero_stage={stage}",
        "train.stop_at_step=0",
        f"run.dir={run}",
    ]
    assert_ok(launch("torchrun", args, child_env(cache_dir)))
    export_hf(run, tmp_path / "hf")  # in the run's precision
    original, exported = safetensors_of(models["qwen3"]), safetensors_of(tmp_path / "hf")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert original.keys() == exported.keys()
    assert all(exported[k].dtype == dtype and torch.equal(exported[k], original[k].to(dtype)) for k in original)
