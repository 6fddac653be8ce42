"""A checkpoint -> a Hugging Face ``LlamaForCausalLM`` directory (``Qwen3ForCausalLM`` with
model.qk_norm) (config.json, model.safetensors, tokenizer.json, tokenizer_config.json), loadable by
``transformers`` and the runtimes that read that format. `dist-lm export` is the command line.

Our model is Llama's architecture with the same conventions (RMSNorm computed in fp32, rotary
embedding on the two halves of each head, SwiGLU, no biases), so the export renames weights and
changes nothing else; Qwen3 is the same with per-head query and key norms. Options without an
equivalent (GeGLU, GELU, other positions, experts) are refused. Dropout is off in the export.
HF's attention sees a whole window: it does not keep documents of a packed window apart.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from dist_lm.config.schema import Config, UserError
from dist_lm.files import as_umask_allows, foreign_entries, holds, replace_dir, staging_dir
from dist_lm.model.transformer import Transformer
from dist_lm.observe import log
from dist_lm.runtime.precision import Precision
from dist_lm.store import checkpoints, hugging_face
from dist_lm.store.hugging_face import hf_name
from dist_lm.train import restore
from dist_lm.use.inference import RunTokenizer, run_tokenizer, saved_config

# What an export writes, and so all that --overwrite may replace.
EXPORT_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        hugging_face.REFERENCE_LOGITS,
    }
)


def hf_config(cfg: Config, tokens: RunTokenizer | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for ``cfg``'s model, with the document tokens of its tokenizer."""
    m = cfg.model
    unlike_llama = [f"model.activation={m.activation} (Llama's MLP is SwiGLU)"] if m.activation != "swiglu" else []
    if m.position != "rope":
        unlike_llama.append(f"model.position={m.position} (Llama uses rotary embeddings)")
    if "moe" in m.layer_types:
        unlike_llama.append("mixture-of-experts layers (model.layer_types)")
    if unlike_llama:
        raise UserError(
            f"export error: {'; '.join(unlike_llama)}: no LlamaForCausalLM equivalent, so this model "
            "cannot be exported in that format"
        )
    # Qwen3 is Llama with RMSNorm on each head's queries and keys before the rotary embedding,
    # exactly model.qk_norm; without it, Llama. Dropout is a training device: off in the export.
    architecture = (
        {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "use_sliding_window": False,
            "layer_types": ["full_attention"] * m.n_layers,
        }
        if m.qk_norm
        else {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "mlp_bias": False}
    )
    rope = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling == "llama3":
        rope |= {
            "rope_type": "llama3",
            "factor": m.rope_scaling_factor,
            "low_freq_factor": m.rope_scaling_low_freq_factor,
            "high_freq_factor": m.rope_scaling_high_freq_factor,
            "original_max_position_embeddings": m.rope_scaling_original_seq_len,
        }
    return {
        **architecture,
        "attention_dropout": 0.0,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.ffn_dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": m.seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": rope,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "initializer_range": m.init_std,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": tokens.bos_id if tokens else None,
        "eos_token_id": tokens.eot_id if tokens else None,
    }


def export_hf(
    source: Path,
    out: Path,
    overwrite: bool = False,
    best: bool = False,
    dtype: str = "trained",
    tokenizer: Path | None = None,
) -> tuple[Path, Path]:
    """Export the checkpoint ``source`` (a checkpoint directory, or a run directory: its newest
    complete checkpoint, or with ``best`` its best) to ``out``, with weights in ``dtype`` (fp32,
    bf16, fp16, or "trained": the run's precision, its fp32 masters rounded as the training
    loop's forward saw them). ``tokenizer``: the run's tokenizer.json where its data has none.
    Beside the weights, our logits on a few tokens (hugging_face.REFERENCE_LOGITS), which an
    import of the export checks itself against where transformers is not installed. Returns
    (checkpoint exported, out)."""
    from safetensors.torch import save_file

    found = checkpoints.find_for_reading(Path(source), best)
    if found.note:
        log.warn(found.note)
    check_out(out, Path(source), found.path, overwrite)
    cfg = saved_config(found)
    try:
        tokens = run_tokenizer(cfg, found, tokenizer)
    except UserError as e:
        raise UserError(f"export error: {e}; the export needs the tokenizer") from None
    torch_dtype = Precision(found.state.precision if dtype == "trained" else dtype).dtype
    config = hf_config(cfg, tokens, torch_dtype)

    weights = restore.consolidated_weights(found.path)
    tensors = {
        hf_name(k): v.to(torch_dtype).contiguous()
        for k, v in weights.items()
        if not (cfg.model.tie_embeddings and k == "lm_head.weight")
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out.parent, f".{out.name}.")  # renamed into place when whole
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_file(reference_logits(cfg, tensors), str(tmp / hugging_face.REFERENCE_LOGITS))
        for written in ("model.safetensors", hugging_face.REFERENCE_LOGITS):
            as_umask_allows(tmp / written)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(
            json.dumps({"eos_token_id": tokens.eot_id, "bos_token_id": tokens.bos_id})
        )
        shutil.copyfile(tokens.path, tmp / "tokenizer.json")
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(cfg, tokens), indent=2))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return found.path, out


def tokenizer_config(cfg: Config, tokens: RunTokenizer) -> dict:
    """tokenizer_config.json: the document tokens and chat template of the run's tokenizer (a
    model's, recorded in its data's meta.json), or ours."""
    ids = tokens.tokenizer.id_to_token
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": tokens.tokens.get("eos_token") or (ids(tokens.eot_id) if tokens.eot_id is not None else None),
        "bos_token": tokens.tokens.get("bos_token") or (ids(tokens.bos_id) if tokens.bos_id is not None else None),
        "model_max_length": cfg.model.seq_len,
        "clean_up_tokenization_spaces": False,
    }
    if tokens.tokens.get("chat_template"):
        config["chat_template"] = tokens.tokens["chat_template"]
    return config


@torch.no_grad()
def reference_logits(cfg: Config, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our forward's logits (fp32, from the exported tensors) on hugging_face.check_input_ids."""
    model = Transformer(cfg.model)
    names = {hf_name(name): name for name in model.state_dict()}
    weights = {names[k]: v.float() for k, v in tensors.items()}
    if cfg.model.tie_embeddings:
        weights["lm_head.weight"] = weights["tok_embeddings.weight"]
    model.load_state_dict(weights)
    ids = hugging_face.check_input_ids(cfg.model.vocab_size)
    return {"input_ids": ids, "logits": model.eval()(ids).float().contiguous()}


def check_out(out: Path, source: Path, checkpoint_dir: Path, overwrite: bool) -> None:
    """Refuse an output directory that --overwrite would have to take more than an export from:
    the checkpoint, its run directory or anything holding them, a directory inside the
    checkpoint, or a directory holding files an export does not write. One line each."""
    for given in (source, checkpoint_dir):
        if holds(out, given):
            raise UserError(
                f"export error: {out} holds the checkpoint being exported ({given}); the export goes "
                "into a directory of its own: choose another"
            )
    if holds(checkpoint_dir, out):
        raise UserError(f"export error: {out} is inside the checkpoint {checkpoint_dir}; choose a directory outside it")
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"export error: {out} is a file; choose a directory")
    foreign = foreign_entries(out, EXPORT_FILES.__contains__)
    if foreign:
        raise UserError(
            f"export error: {out} holds {', '.join(foreign[:3])}, which an export does not write; "
            "--overwrite replaces only an earlier export: choose another directory"
        )
    if not overwrite:
        raise UserError(f"export error: {out} exists; choose another directory or pass --overwrite")


def export_notes(cfg: Config) -> list[str]:
    """What a user of the export must know that its config cannot say."""
    if cfg.data.document_mask:
        return [
            "this model trained with data.document_mask (attention within each document of a packed window, "
            "positions restarting at each); Hugging Face's default attention does not mask documents: give it "
            "one document per sequence"
        ]
    return []
