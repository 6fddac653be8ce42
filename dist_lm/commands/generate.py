"""Generate text from a checkpoint, with a key/value cache.

    dist-lm generate RUN_OR_CHECKPOINT --prompt "The" [--max-tokens 100] [--temperature 0.8]
                             [--top-k 50] [--top-p 0.95] [--seed 0] [--no-cache] [--best] [--dtype fp32]

Stops at the end-of-text token, at --max-tokens, or when the model's context is full.
Temperature 0 is greedy decoding.
"""

from __future__ import annotations

import argparse
import sys

from dist_lm.commands.arguments import add_checkpoint_choice
from dist_lm.config.schema import UserError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_choice(p)
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50, help="0: no top-k cut")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")
    args = p.parse_args(argv)

    import torch

    from dist_lm.use.generate import sample
    from dist_lm.use.inference import load_model, load_tokenizer
    from dist_lm.data.readers import EOT

    try:
        model, cfg, found = load_model(args.checkpoint, args.best, args.dtype)
        tokenizer = load_tokenizer(cfg, found)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    eot = tokenizer.token_to_id(EOT)
    prompt = tokenizer.encode(args.prompt).ids or [eot]
    out = sample(model.to(device), prompt, args.max_tokens, cfg.model.seq_len, device, args.temperature, args.top_k,
                 args.top_p, args.seed, stop_id=eot, use_cache=not args.no_cache)
    print(tokenizer.decode([t for t in prompt if t != eot] + out))
    return 0
