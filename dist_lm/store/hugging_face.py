"""Hugging Face model directories, both ways: the names of the weights, reading a directory's
safetensors into our model (model.init_from; :mod:`dist_lm.config.hugging_face` reads its
config.json), and the logits check that proves our forward is the architecture the directory
claims. :mod:`dist_lm.use.export` writes such directories.

Weights arrive as safetensors only (one file, or shards listed by model.safetensors.index.json):
it holds tensors and nothing else, so nothing from the directory is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dist_lm.config.schema import ModelConfig, UserError
from dist_lm.model.counts import parameter_shapes
from dist_lm.model.transformer import Transformer

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
# Logits of our forward on a few tokens, written by an export so that an import of it can be
# checked where transformers is not installed: safetensors with input_ids (1, n) and logits (1, n, vocab).
REFERENCE_LOGITS = "reference_logits.safetensors"
CHECK_TOKENS = 8
# The export test's 1e-4, relative as well as absolute: a real model's logits reach tens, and
# two fp32 implementations of it sum in different orders.
CHECK_ATOL = CHECK_RTOL = 1e-4

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
    # model.qk_norm, as Qwen3 has them (Llama's layout with per-head query and key norms)
    "blocks.{i}.attn.q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blocks.{i}.attn.k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
}


def hf_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blocks":
        return NAMES[".".join(["blocks", "{i}", *parts[2:]])].format(i=parts[1])
    return NAMES[name]


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory: the shards its index lists, or its one file.
    One line for a missing index entry or shard."""
    index = directory / WEIGHTS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"model.init_from: {index} is not a safetensors index ({e!r})") from None
        files = [directory / name for name in names]
        bad = next((n for n, f in zip(names, files) if Path(n).name != n or not f.is_file()), None)
        if bad is not None:
            raise UserError(
                f"model.init_from: {directory} lacks {bad}, a shard its {WEIGHTS_INDEX} lists; download it again"
            )
        return files
    if (directory / WEIGHTS).is_file():
        return [directory / WEIGHTS]
    pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt*")]
    also = f" ({', '.join(sorted(pickled)[:2])} are pickles, which dist-lm does not load)" if pickled else ""
    raise UserError(
        f"model.init_from: {directory} has no {WEIGHTS} or {WEIGHTS_INDEX}{also}; save the model as safetensors"
    )


def read_weights(directory: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The directory's tensors under our names, as they are stored (their dtype). Every tensor
    our model has must be there once with its shape and finite values; a tensor it does not have
    is refused by name (it is something our forward would ignore)."""
    from safetensors import SafetensorError, safe_open

    ours = {hf_name(name): (name, shape) for name, shape in parameter_shapes(cfg).items()}
    if cfg.tie_embeddings:  # one matrix under the embedding's name; an extra copy as lm_head is ignored
        ours.pop(hf_name("lm_head.weight"))
    weights: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        try:
            with safe_open(str(path), framework="pt") as stored:
                for key in stored.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if key.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and key == "lm_head.weight"):
                        continue  # older files keep the rotary frequencies, computed from config.json here
                    if key not in ours:
                        raise UserError(
                            f"model.init_from: {path} holds {key}, which the model its config.json describes has "
                            "no place for; is config.json this model's?"
                        )
                    name, shape = ours[key]
                    tensor = stored.get_tensor(key)
                    if tuple(tensor.shape) != shape:
                        raise UserError(
                            f"model.init_from: {path}: {key} has shape {tuple(tensor.shape)}, but config.json makes "
                            f"it {shape}; is config.json this model's?"
                        )
                    if not torch.isfinite(tensor).all():
                        raise UserError(f"model.init_from: {path}: {key} holds inf or NaN values; download it again")
                    weights[name] = tensor
        except SafetensorError as e:
            raise UserError(
                f"model.init_from: {path} is not a whole safetensors file ({e}); download it again"
            ) from None
    missing = [key for key, (name, _) in ours.items() if name not in weights]
    if missing:
        raise UserError(
            f"model.init_from: {directory} lacks {missing[0]}"
            f"{f' and {len(missing) - 1} more tensors' if len(missing) > 1 else ''}; download it again"
        )
    if cfg.tie_embeddings:
        weights["lm_head.weight"] = weights["tok_embeddings.weight"]
    return weights


def load_into(model: Transformer, directory: Path) -> torch.dtype:
    """Copy the directory's weights into ``model`` (whole, before an engine partitions it).
    Returns the dtype they were stored in."""
    weights = read_weights(directory, model.cfg)
    with torch.no_grad():
        model.load_state_dict(weights, strict=True)
    return next(iter(weights.values())).dtype


def check_input_ids(vocab_size: int) -> torch.Tensor:
    """A few tokens spread over the vocabulary, the same on every machine."""
    return ((torch.arange(CHECK_TOKENS) * 7919 + 11) % vocab_size).unsqueeze(0)


@torch.no_grad()
def reference_logits(directory: Path, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """(input ids, logits, what gave them) to hold our forward to: transformers' own model of the
    directory where transformers is installed, else the logits saved beside the weights
    (REFERENCE_LOGITS), else None."""
    try:
        import transformers
    except ImportError:
        transformers = None
    if transformers is not None:
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
        ids = check_input_ids(vocab_size)
        return ids, hf(ids).logits.float(), f"transformers {transformers.__version__}"
    saved = directory / REFERENCE_LOGITS
    if saved.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(saved))
            return tensors["input_ids"].long(), tensors["logits"].float(), str(saved)
        except (SafetensorError, KeyError) as e:
            raise UserError(f"model.init_from: {saved} is not a file of input_ids and logits ({e})") from None
    return None


@torch.no_grad()
def check_logits(model: Transformer, directory: Path) -> str | None:
    """Hold our forward of the loaded weights (fp32, on the CPU) to the reference logits; a
    UserError when they differ. Returns what was checked, for the log (None: nothing to check
    against)."""
    reference = reference_logits(directory, model.cfg.vocab_size)
    if reference is None:
        return None
    ids, expected, source = reference
    was_training = model.training
    ours = model.eval()(ids).float()
    model.train(was_training)
    if ours.shape != expected.shape or not torch.allclose(ours, expected, atol=CHECK_ATOL, rtol=CHECK_RTOL):
        differs = (ours - expected).abs().max().item() if ours.shape == expected.shape else f"shape {tuple(ours.shape)}"
        raise UserError(
            f"model.init_from: our forward of {directory} differs from {source}'s logits (largest difference "
            f"{differs}, tolerance {CHECK_ATOL} + {CHECK_RTOL} x |logit|): the weights or config.json are not the "
            "architecture they claim; report it with the directory's config.json"
        )
    return f"model.init_from: our logits on {ids.shape[1]} tokens equal {source}'s (within {CHECK_ATOL})"
