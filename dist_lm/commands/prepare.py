"""Turn raw text into token shards that training reads with data.dir=OUT.

    dist-lm prepare INPUT... --out DIR [--tokenizer tokenizer.json | --tokenizer MODEL_DIR | --vocab-size N]
                                 [--workers N] [--val-fraction F] [--seed S] [--field NAME]
                                 [--skip-bad-lines] [--shard-tokens N] [--overwrite]

INPUT: files, directories or globs of .txt (a file is a document), .jsonl, .jsonl.gz, .jsonl.zst
(a line is a document: its text, content, message, body or output field, or --field; a
'messages' list of {role, content} is rendered as a chat with a special token per role),
.parquet and .arrow files and datasets saved with Hugging Face datasets' save_to_disk (a row is
a document: the same columns, or --field).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from dist_lm.commands.arguments import Parser, integer, number
from dist_lm.config.schema import MAX_SEED, UserError
from dist_lm.data.prepare import prepare
from dist_lm.data.readers import expand_inputs
from dist_lm.data.shards import is_dataset_file
from dist_lm.files import foreign_entries, holds


def check_out(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an --out that holds an input, or that --overwrite would have to take more than a
    dataset from: a directory that is not one prepare wrote (its meta.json, tokenizer.json and
    shards alone). One line each."""
    held = next((p for p in inputs if holds(out, p)), None)
    if held is not None:
        raise UserError(
            f"--out {out} holds the input {held}; the dataset goes into a directory of its own: choose another --out"
        )
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a directory")
    foreign = foreign_entries(out, is_dataset_file)
    if foreign:
        raise UserError(
            f"--out {out} holds {', '.join(foreign[:3])}, which prepare does not write; --overwrite "
            "replaces only a dataset that prepare made: choose another --out"
        )
    if not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it, or choose another --out")


def main(argv: list[str] | None = None) -> int:
    p = Parser(__doc__)
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--out", required=True, type=Path, help="output directory (written atomically)")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--tokenizer",
        type=Path,
        help="an existing HF tokenizer.json, or a Hugging Face model directory: its tokenizer and document "
        "tokens as the model defines them, for model.init_from (docs/continued-pretraining.md)",
    )
    src.add_argument(
        "--vocab-size",
        type=integer(300, 2**32),
        default=32768,
        help="train a byte-level BPE of this size (default 32768)",
    )
    p.add_argument(
        "--workers", type=integer(1, 4096), default=os.cpu_count() or 1, help="tokenizer processes (default: all cores)"
    )
    p.add_argument(
        "--val-fraction",
        type=number(0, 1, high_open=True),
        default=0.01,
        help="documents held out for validation (default 0.01); of one .txt input, that share of its "
        "end, cut at a line end",
    )
    p.add_argument("--seed", type=integer(0, MAX_SEED), default=0, help="seed of the train/validation split")
    p.add_argument("--field", help="JSONL field holding the text (default: detected)")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip and count invalid JSONL lines")
    p.add_argument("--shard-tokens", type=integer(1), default=100_000_000, help="tokens per shard file (default 1e8)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists (only once the new one is complete)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        inputs = expand_inputs(args.inputs)
        check_out(args.out, inputs, args.overwrite)
        result = prepare(
            inputs,
            args.out,
            args.tokenizer,
            args.vocab_size,
            args.workers,
            args.val_fraction,
            args.seed,
            args.field,
            args.skip_bad_lines,
            args.shard_tokens,
            command=shlex.join(["dist-lm", "prepare", *(argv if argv is not None else sys.argv[1:])]),
            progress=not args.quiet,
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = result.stats
    if result.files_already_done:
        print(
            f"{result.files_already_done} of the input files were done by an interrupted run of this command "
            "and were not read again"
        )
    if result.tokens["val"] == 0:
        print(
            f"warning: {result.out} has no validation data (--val-fraction {args.val_fraction} held out no "
            "document): training will measure validation loss on training windows; raise --val-fraction",
            file=sys.stderr,
        )
    print(
        f"{result.out}: {s.documents:,} documents, {result.tokens['train']:,} train and {result.tokens['val']:,} "
        f"validation tokens, {s.chars / 1e6:.1f} MB in {result.seconds:.1f} s"
        + (f", {s.skipped_lines} bad lines skipped" if s.skipped_lines else "")
    )
    return 0
