"""Turn raw text into token shards that training reads with data.dir=OUT.

    dist-lm prepare INPUT... --out DIR [--tokenizer tokenizer.json | --vocab-size N]
                                 [--workers N] [--val-fraction F] [--seed S] [--field NAME]
                                 [--skip-bad-lines] [--shard-tokens N] [--overwrite]

INPUT: files, directories or globs of .txt (a file is a document), .jsonl, .jsonl.gz, .jsonl.zst
(a line is a document: its text, content, message, body or output field, or --field; a
'messages' list of {role, content} is rendered as a chat with a special token per role).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path


from dist_lm.config.schema import UserError
from dist_lm.data.prepare import prepare
from dist_lm.data.readers import expand_inputs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--out", required=True, type=Path, help="output directory (written atomically)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--tokenizer", type=Path, help="an existing HF tokenizer.json")
    src.add_argument("--vocab-size", type=int, default=32768, help="train a byte-level BPE of this size (default 32768)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes (default: all cores)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="documents held out for validation (default 0.01); of one .txt input, that share of its "
                        "end, cut at a line end")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument("--field", help="JSONL field holding the text (default: detected)")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip and count invalid JSONL lines")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file (default 1e8)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once the new one is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        if not 0 <= args.val_fraction < 1:
            raise UserError(f"--val-fraction {args.val_fraction}: must be in [0, 1)")
        if args.workers < 1 or args.shard_tokens < 1 or args.vocab_size < 300:
            raise UserError("--workers and --shard-tokens must be positive, --vocab-size at least 300")
        if args.out.exists() and not args.overwrite:
            raise UserError(f"{args.out} exists; pass --overwrite to replace it, or choose another --out")
        result = prepare(expand_inputs(args.inputs), args.out, args.tokenizer, args.vocab_size, args.workers,
                         args.val_fraction, args.seed, args.field, args.skip_bad_lines, args.shard_tokens,
                         command=shlex.join(["tools/prepare_data.py", *(argv if argv is not None else sys.argv[1:])]),
                         progress=not args.quiet)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = result.stats
    if result.files_already_done:
        print(f"{result.files_already_done} of the input files were done by an interrupted run of this command "
              "and were not read again")
    if result.tokens["val"] == 0:
        print(f"warning: {result.out} has no validation data (--val-fraction {args.val_fraction} held out no "
              "document): training will measure validation loss on training windows; raise --val-fraction",
              file=sys.stderr)
    print(f"{result.out}: {s.documents:,} documents, {result.tokens['train']:,} train and {result.tokens['val']:,} "
          f"validation tokens, {s.chars / 1e6:.1f} MB in {result.seconds:.1f} s"
          + (f", {s.skipped_lines} bad lines skipped" if s.skipped_lines else ""))
    return 0
