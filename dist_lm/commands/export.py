"""Export a checkpoint to a Hugging Face LlamaForCausalLM directory (Qwen3ForCausalLM with model.qk_norm).

    dist-lm export runs/NAME OUT_DIR                        # the run's newest complete checkpoint
    dist-lm export runs/NAME/checkpoints/step00001000 OUT_DIR [--overwrite]
    dist-lm export runs/NAME OUT_DIR --best [--dtype fp32]   # the lowest validation loss; fp32 masters

The weights are the checkpoint's fp32 masters, written in the precision the run trained in
(--dtype trained, the default: bf16 for a bf16 run, as its training forward saw them; fp32 for a
bf16-autocast run, whose weights are fp32), or in
--dtype fp32, bf16 or fp16.

Then: transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR), AutoTokenizer.from_pretrained(OUT_DIR).
transformers is not a dependency of dist-lm: `pip install transformers` (the dev extra has it).
--overwrite replaces only an earlier export (a directory holding nothing but the files an export
writes). Beside the weights goes reference_logits.safetensors, our logits on a few tokens, which
model.init_from checks an import of the export against where transformers is not installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dist_lm.commands.arguments import DTYPES, Parser, add_trust_option
from dist_lm.config.schema import UserError


def main(argv: list[str] | None = None) -> int:
    p = Parser(__doc__)
    p.add_argument("source", type=Path, help="a run directory or a checkpoint directory")
    p.add_argument("out", type=Path, help="the directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--best", action="store_true", help="the run's checkpoint with the lowest validation loss")
    p.add_argument(
        "--dtype", choices=DTYPES, default="trained", help="precision of the exported weights (default: the run's)"
    )
    p.add_argument(
        "--tokenizer",
        type=Path,
        help="the tokenizer.json the run's tokens were made with (or a directory holding one), where its data "
        "has none (nanoGPT's train.bin) or it has moved",
    )
    add_trust_option(p)
    args = p.parse_args(argv)
    from dist_lm.store import checkpoints
    from dist_lm.train import restore
    from dist_lm.use.export import export_hf, export_notes
    from dist_lm.use.inference import saved_config

    restore.trust_checkpoints(args.trust_checkpoint)

    try:
        exported, out = export_hf(args.source, args.out, args.overwrite, args.best, args.dtype, args.tokenizer)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {exported} to {out}")
    for note in export_notes(saved_config(checkpoints.find_for_reading(exported))):
        print(f"note: {note}")
    return 0
