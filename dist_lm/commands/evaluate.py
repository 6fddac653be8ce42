"""Loss, perplexity and bits per byte of a checkpoint on a held-out split.

    dist-lm evaluate RUN_OR_CHECKPOINT [--best] [--data DIR] [--samples 512] [--micro-batch 8]
    torchrun --nproc_per_node 8 -m dist_lm evaluate RUN_OR_CHECKPOINT --data DIR   # split over ranks

The windows are the first --samples of the data's val split (its train split if it has none):
the same ones the training loop evaluates with train.eval_samples, and the model runs in the
precision it trained in (--dtype), so the loss is the training loop's at the same micro-batch.
Default data: the data the checkpoint was trained on.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from dist_lm.commands.arguments import Parser, add_checkpoint_choice, integer
from dist_lm.config.schema import UserError


def check_same_tokenizer(data_dir: Path, found) -> None:
    """Refuse data of another tokenizer than the checkpoint's: its ids mean other tokens (the
    vocabulary check would only advise raising model.vocab_size, which a trained model cannot)."""
    from dist_lm.data import shards

    theirs, ours = shards.read_meta(data_dir).get("tokenizer_sha256"), found.state.tokenizer_sha256
    if theirs and ours and theirs != ours:
        raise UserError(
            f"data error: {data_dir} was made with tokenizer {theirs[:12]}, but {found.path} was trained on "
            f"tokens of tokenizer {ours[:12]}: evaluate on data prepared with the run's tokenizer "
            "(dist-lm prepare ... --tokenizer <the run's data>/tokenizer.json)"
        )


def main(argv: list[str] | None = None) -> int:
    p = Parser(__doc__)
    add_checkpoint_choice(p)
    p.add_argument("--data", help="a dataset directory (default: the checkpoint's training data)")
    p.add_argument("--samples", type=integer(1), help="windows to evaluate (default: the run's train.eval_samples)")
    p.add_argument("--micro-batch", type=integer(1, 1 << 20), default=8, help="windows per forward pass")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    from dist_lm.config.schema import replaced
    from dist_lm.data.checks import resolve_data
    from dist_lm.data.sampler import ValData
    from dist_lm.runtime import distributed, launch
    from dist_lm.train import restore
    from dist_lm.use.inference import evaluate, load_model, load_tokenizer

    restore.trust_checkpoints(args.trust_checkpoint)
    try:
        model, cfg, found = load_model(args.checkpoint, args.best, args.dtype)
        if args.data:
            cfg = replaced(cfg, "data", dir=args.data, mixture=[])
            check_same_tokenizer(Path(args.data), found)
        data = resolve_data(cfg)
        cfg = data.config
        env = launch.detect(os.environ)
        device = distributed.device_for(env)
        distributed.init_process_group(env, device, cfg.parallel.timeout_minutes)
        tokenizer = load_tokenizer(cfg, found) if data.meta.get("tokenizer") else None
        model = model.to(device)
        results = {}
        for source in data.sources:
            val = ValData(
                source.dir,
                source.meta,
                cfg.model.seq_len,
                args.samples or cfg.train.eval_samples,
                args.micro_batch,
                env.rank,
                env.world_size,
                device,
                data.meta.get("eot_id") if cfg.data.document_mask else None,
            )
            results[source.name] = {"data": str(source.dir), "split": val.split, **evaluate(model, val, tokenizer)}
        if len(results) == 1:
            result = {"checkpoint": str(found.path), **results[data.sources[0].name]}
        else:  # a mixture: each source, and the loss weighted as the mixture is (as training reports it)
            loss = sum(s.weight * results[s.name]["loss"] for s in data.sources)
            result = {
                "checkpoint": str(found.path),
                "data": data.describe(),
                "loss": loss,
                "perplexity": math.exp(min(loss, 50.0)),
                "sources": results,
            }
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if distributed.is_rank0():
        print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    distributed.teardown()
    return 0
