"""Generate text from a checkpoint, with a key/value cache.

    dist-lm generate RUN_OR_CHECKPOINT --prompt "The" [--max-tokens 100] [--temperature 0.8]
                             [--top-k 50] [--top-p 0.95] [--seed 0] [--no-cache] [--best] [--dtype fp32]
                             [--tokenizer PATH]

The prompt begins with the beginning-of-sequence token where the run's tokenizer has one (a
model's, for a run of model.init_from). Stops at the end-of-text token (the model's end of
sequence), at --max-tokens, or when the model's context is full.
Temperature 0 is greedy decoding.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dist_lm.commands.arguments import Parser, add_checkpoint_choice, integer, number
from dist_lm.config.schema import MAX_SEED, UserError


def main(argv: list[str] | None = None) -> int:
    p = Parser(__doc__)
    add_checkpoint_choice(p)
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-tokens", type=integer(0), default=100)
    p.add_argument("--temperature", type=number(0, 1e6), default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=integer(0), default=50, help="0: no top-k cut")
    p.add_argument("--top-p", type=number(0, 1, low_open=True), default=1.0, help="nucleus sampling; 1: off")
    p.add_argument("--seed", type=integer(0, MAX_SEED), default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")
    p.add_argument(
        "--tokenizer",
        type=Path,
        help="the tokenizer.json the run's tokens were made with (or a directory holding one), where its data "
        "has none (nanoGPT's train.bin) or it has moved",
    )
    args = p.parse_args(argv)

    import torch

    from dist_lm.train import restore
    from dist_lm.use.generate import sample
    from dist_lm.use.inference import load_model, run_tokenizer

    restore.trust_checkpoints(args.trust_checkpoint)
    try:
        model, cfg, found = load_model(args.checkpoint, args.best, args.dtype)
        tokens = run_tokenizer(cfg, found, args.tokenizer)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, eot = tokens.tokenizer, tokens.eot_id
    opening = [tokens.bos_id] if tokens.bos_id is not None else []
    prompt = opening + tokenizer.encode(args.prompt, add_special_tokens=False).ids or [eot]
    out = sample(
        model.to(device),
        prompt,
        args.max_tokens,
        cfg.model.seq_len,
        device,
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        stop_id=eot,
        use_cache=not args.no_cache,
    )
    print(tokenizer.decode([t for t in prompt if t != eot] + out))  # decode drops the special tokens
    return 0
