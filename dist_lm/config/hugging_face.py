"""model.init_from: a Hugging Face model directory's config.json -> our model keys.

JSON only, no torch: the launcher resolves the config before importing it, so an architecture we
do not implement is refused in a fraction of a second, before anything is written. The weights
are read by :mod:`dist_lm.store.hugging_face` when a fresh run builds its model.

Llama, Mistral and Qwen3 are our model with other names: RMSNorm, rotary embeddings on the two
halves of each head, SwiGLU, no biases; Qwen3 adds per-head query and key norms (model.qk_norm)
and may set the head width apart from d_model (model.head_dim); Llama 3.1+ scales the rotary
frequencies (model.rope_scaling=llama3). Anything else is refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dist_lm.config.errors import ConfigError

CONFIG_FILE = "config.json"
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen3ForCausalLM": "qwen3"}
# Architectures users reach for that we do not implement, and what of them we lack.
NOT_IMPLEMENTED = {
    "MixtralForCausalLM": "mixture-of-experts MLPs",
    "Qwen3MoeForCausalLM": "mixture-of-experts MLPs",
    "Qwen2MoeForCausalLM": "mixture-of-experts MLPs",
    "OlmoeForCausalLM": "mixture-of-experts MLPs",
    "DeepseekV3ForCausalLM": "mixture-of-experts MLPs and latent attention",
    "Qwen2ForCausalLM": "biases in the attention projections",
    "GemmaForCausalLM": "Gemma's norms (1 + weight) and scaled embeddings",
    "Gemma2ForCausalLM": "Gemma's norms (1 + weight), scaled embeddings and soft-capped logits",
    "Gemma3ForCausalLM": "Gemma's norms (1 + weight), scaled embeddings and sliding-window attention",
    "Olmo2ForCausalLM": "norms after each block's attention and MLP (OLMo 2's reordered norms)",
    "Phi3ForCausalLM": "fused query/key/value projections",
    "GPT2LMHeadModel": "learned positions, LayerNorm and biases",
}
KEY = "model.init_from"


def read_config(directory: Path) -> dict:
    """The directory's config.json as a mapping; one line when it is not there or not JSON."""
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise ConfigError(
            KEY, f"{directory} is not a directory; give a Hugging Face model directory (config.json, *.safetensors)"
        )
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(KEY, f"{directory} has no {CONFIG_FILE}: it is not a Hugging Face model directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(KEY, f"{path} is not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(KEY, f"{path} is not a JSON object")
    return config


def rope_parameters(config: dict) -> dict:
    """The rotary settings: transformers 5 writes ``rope_parameters`` (with rope_theta inside),
    earlier versions ``rope_theta`` and ``rope_scaling`` (with ``type`` in older files still)."""
    given = config.get("rope_parameters") or {**(config.get("rope_scaling") or {})}
    if not isinstance(given, dict):
        return {"rope_type": repr(given)}
    rope = {**given, "rope_type": given.get("rope_type", given.get("type", "default"))}
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return rope


def model_keys(config: dict, directory: Path) -> dict[str, Any]:
    """Our model keys for the architecture ``config`` describes; a ConfigError naming the first
    thing we do not implement."""
    where = directory / CONFIG_FILE

    def refuse(what: str) -> ConfigError:
        return ConfigError(
            KEY, f"{where}: {what}, which dist-lm does not implement; start from a Llama, Mistral or Qwen3 model"
        )

    architectures = config.get("architectures") or []
    architecture = architectures[0] if isinstance(architectures, list) and architectures else None
    if architecture not in ARCHITECTURES:
        lacking = NOT_IMPLEMENTED.get(architecture)
        raise refuse(f"{architecture} ({lacking})" if lacking else f"architecture {architecture!r}")
    kind = ARCHITECTURES[architecture]
    if config.get("hidden_act", "silu") != "silu":
        raise refuse(f"hidden_act={config['hidden_act']} (our gated MLP is SwiGLU)")
    for bias in ("attention_bias", "mlp_bias"):
        if config.get(bias):
            raise refuse(f"{bias}=true (biases in the {bias.split('_')[0]} projections)")
    if config.get("num_local_experts") or config.get("num_experts"):
        raise refuse("mixture-of-experts MLPs")
    window = config.get("sliding_window") if kind == "mistral" or config.get("use_sliding_window") else None
    if window is not None:
        raise refuse(f"sliding-window attention (sliding_window={window})")
    attention_kinds = set(config.get("layer_types") or ["full_attention"])
    if attention_kinds != {"full_attention"}:
        raise refuse(f"layer_types {sorted(attention_kinds)} (only full attention)")
    rope = rope_parameters(config)
    if rope["rope_type"] not in ("default", "llama3"):
        raise refuse(f"rope_type={rope['rope_type']} (rotary scaling other than Llama 3's)")
    try:
        d_model, n_heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        keys: dict[str, Any] = {
            "vocab_size": int(config["vocab_size"]),
            "d_model": d_model,
            "n_layers": int(config["num_hidden_layers"]),
            "n_heads": n_heads,
            "n_kv_heads": int(config.get("num_key_value_heads") or n_heads),
            "ffn_hidden": int(config["intermediate_size"]),
            "activation": "swiglu",
            "position": "rope",
            "layer_types": [],
            "rope_theta": float(rope["rope_theta"]),
            "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
            "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
            "qk_norm": kind == "qwen3",
            "rope_scaling": rope["rope_type"].replace("default", "none"),
        }
        head_dim = config.get("head_dim")
        # Stored only where it differs, so that a Llama's config reads as one of ours made from scratch.
        keys["head_dim"] = int(head_dim) if head_dim and int(head_dim) * n_heads != d_model else None
        if rope["rope_type"] == "llama3":
            keys |= {
                "rope_scaling_factor": float(rope["factor"]),
                "rope_scaling_low_freq_factor": float(rope["low_freq_factor"]),
                "rope_scaling_high_freq_factor": float(rope["high_freq_factor"]),
                "rope_scaling_original_seq_len": int(rope["original_max_position_embeddings"]),
            }
    except KeyError as e:
        raise ConfigError(KEY, f"{where} has no {e.args[0]}, which a {architecture} config holds") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(KEY, f"{where} holds a value of the wrong type ({e})") from None
    return keys
