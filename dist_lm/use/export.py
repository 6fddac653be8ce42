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
from dist_lm.data.readers import EOT
from dist_lm.files import as_umask_allows, foreign_entries, holds, replace_dir, staging_dir
from dist_lm.observe import log
from dist_lm.runtime.precision import Precision
from dist_lm.store import checkpoints
from dist_lm.train import restore
from dist_lm.use.inference import find_tokenizer, saved_config

# What an export writes, and so all that --overwrite may replace.
EXPORT_FILES = frozenset(
    {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
)
# our name -> Hugging Face Llama's name; {i} is the block index
NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "blocks.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blocks.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blocks.{i}.attn.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blocks.{i}.attn.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blocks.{i}.attn.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blocks.{i}.attn.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blocks.{i}.mlp.w_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blocks.{i}.mlp.w_in.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blocks.{i}.mlp.w_out.weight": "model.layers.{i}.mlp.down_proj.weight",
    # model.qk_norm, exported as Qwen3 (Llama's layout with per-head query and key norms)
    "blocks.{i}.attn.q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blocks.{i}.attn.k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
}


def hf_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blocks":
        return NAMES[".".join(["blocks", "{i}", *parts[2:]])].format(i=parts[1])
    return NAMES[name]


def hf_config(cfg: Config, eot_id: int | None, dtype: torch.dtype = torch.float32) -> dict:
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
    return {
        **architecture,
        "attention_dropout": 0.0,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.ffn_dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "initializer_range": m.init_std,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": None,
        "eos_token_id": eot_id,
    }


def export_hf(
    source: Path, out: Path, overwrite: bool = False, best: bool = False, dtype: str = "trained"
) -> tuple[Path, Path]:
    """Export the checkpoint ``source`` (a checkpoint directory, or a run directory: its newest
    complete checkpoint, or with ``best`` its best) to ``out``, with weights in ``dtype`` (fp32,
    bf16, fp16, or "trained": the run's precision, its fp32 masters rounded as the training
    loop's forward saw them). Returns (checkpoint exported, out)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    found = checkpoints.find_for_reading(Path(source), best)
    if found.note:
        log.warn(found.note)
    check_out(out, Path(source), found.path, overwrite)
    cfg = saved_config(found)
    tokenizer_path = find_tokenizer(cfg, found.state.tokenizer_sha256)
    if tokenizer_path is None:
        raise UserError(
            f"export error: the tokenizer of {found.path} (data.dir={cfg.data.dir}) is not there any more; "
            "the export needs its tokenizer.json"
        )
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    eot_id = tokenizer.token_to_id(EOT)
    torch_dtype = Precision(found.state.precision if dtype == "trained" else dtype).dtype
    config = hf_config(cfg, eot_id, torch_dtype)

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
        as_umask_allows(tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": eot_id, "bos_token_id": None}))
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "eos_token": EOT,
                    "bos_token": None,
                    "model_max_length": cfg.model.seq_len,
                    "clean_up_tokenization_spaces": False,
                },
                indent=2,
            )
        )
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return found.path, out


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
