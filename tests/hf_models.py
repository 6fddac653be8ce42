"""Tiny Hugging Face model directories that transformers makes in the tests, with random weights
and no download: a Llama 3 (grouped-query attention, Llama 3.1's rotary scaling, a tokenizer that
puts a beginning-of-text token first), a Qwen3 (query/key norms, heads wider than
d_model / n_heads, tied embeddings, no beginning token, a chat template) and a Mistral. Each
tokenizer is a byte-level BPE trained here on a few hundred documents of the embedded corpus."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

VOCAB = 384  # the models' vocabulary; the tokenizers hold fewer tokens, as real ones often do
SPECIALS = {
    "llama": ("<|begin_of_text|>", "<|end_of_text|>"),
    "qwen3": (None, "<|endoftext|>"),
    "mistral": ("<s>", "</s>"),
}
QWEN_CHAT = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
)


def texts(count: int = 300) -> list[str]:
    return _corpus()[:count]


@functools.cache
def _corpus() -> list[str]:
    """The embedded corpus's documents (read from the standard library's sources: seconds, once)."""
    from dist_lm.data.corpus import documents

    return documents()


def write_tokenizer(directory: Path, kind: str) -> None:
    """tokenizer.json and tokenizer_config.json as the model's own: its special tokens, a BOS put
    first by the post-processor where the model has one, Qwen's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bos, eos = SPECIALS[kind]
    specials = [t for t in (bos, eos) if t] + (["<|im_start|>", "<|im_end|>"] if kind == "qwen3" else [])
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 40, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts(), trainer=trainer)
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": bos}
    if kind == "qwen3":
        config["chat_template"] = QWEN_CHAT
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def make_model(
    directory: Path, kind: str, dtype: torch.dtype = torch.float32, shards: str | None = None, **sizes
) -> Path:
    """A random ``kind`` model saved by transformers' save_pretrained into ``directory``, in
    ``dtype``; ``shards`` (e.g. "40KB") splits its safetensors into shards with an index.
    ``sizes``: config keys in place of the tiny defaults (tools/bench_import.py makes a 1B)."""
    import transformers

    torch.manual_seed(0)
    common = (
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
        | sizes
    )
    if kind == "llama":
        config = transformers.LlamaConfig(
            **common,
            rope_theta=500000.0,
            # original context 32: the scaling changes the frequencies at the tests' short windows
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
        model = transformers.LlamaForCausalLM(config)
    elif kind == "qwen3":
        config = transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True, rms_norm_eps=1e-6)
        model = transformers.Qwen3ForCausalLM(config)
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=None))
    with torch.no_grad():  # norms away from their ones, so a weight left out or misplaced shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    directory.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(directory, **({"max_shard_size": shards} if shards else {}))
    write_tokenizer(directory, kind)
    return directory
