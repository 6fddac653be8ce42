"""Using a trained checkpoint outside training: its model with consolidated weights, its
config and its tokenizer (for dist-lm generate, dist-lm evaluate and dist-lm export)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_lm.config.io import from_dict
from dist_lm.config.schema import Config, UserError
from dist_lm.data import corpus
from dist_lm.data.readers import EOT
from dist_lm.data.sampler import ValData
from dist_lm.data.shards import sha256_file
from dist_lm.model.loss import TrainingOptions
from dist_lm.model.transformer import Transformer
from dist_lm.observe import log
from dist_lm.runtime.precision import Precision
from dist_lm.store import checkpoints
from dist_lm.train import restore


def saved_config(found: checkpoints.Found) -> Config:
    return from_dict(found.state.config, str(found.path / checkpoints.STATE))


def find_tokenizer(cfg: Config, sha256: str | None) -> Path | None:
    """The tokenizer.json the run trained with (the same bytes, by hash), if it is still there."""
    if cfg.data.dir or cfg.data.mixture:  # a mixture's sources share one tokenizer
        candidates = [Path(d) / "tokenizer.json" for d in [cfg.data.dir] + [m.dir for m in cfg.data.mixture] if d]
    else:
        candidates = sorted(corpus.cache_root(cfg.data.cache_dir).glob("embedded-*/tokenizer.json"))
    return next((p for p in candidates if p.is_file() and (sha256 is None or sha256_file(p) == sha256)), None)


def load_model(path: Path, best: bool = False, dtype: str = "fp32") -> tuple[Transformer, Config, checkpoints.Found]:
    """Our model with a checkpoint's full weights, in eval mode, on the CPU. ``path``: a
    checkpoint directory, or a run directory (its newest complete checkpoint, or with ``best``
    the one with the lowest validation loss). ``dtype``: fp32, bf16, fp16, or "trained" for the
    precision the run trained in (the weights the training loop's forward used: its fp32
    masters rounded to that precision; for bf16-autocast the fp32 weights, run under autocast)."""
    found = checkpoints.find_for_reading(Path(path), best)
    if found.note:
        log.warn(found.note)
    cfg = saved_config(found)
    if "moe" in cfg.model.layer_types:
        raise UserError(
            f"{found.path} has mixture-of-experts layers, which need DeepSpeed's engine to run; "
            "use the training launcher's evaluation (train.eval_interval) for them"
        )
    precision = Precision(found.state.precision if dtype == "trained" else dtype)
    # a bf16-autocast run: fp32 weights, bf16 products
    model = Transformer(cfg.model, options=TrainingOptions(autocast_dtype=precision.autocast_dtype))
    weights = restore.consolidated_weights(found.path)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # names or shapes that are not this model's
        raise checkpoints.CheckpointError(
            f"checkpoint error: the weights of {found.path} do not fit the model its "
            f"state.json describes ({str(e).splitlines()[0]}); use another "
            "checkpoint"
        ) from None
    return model.to(precision.dtype).eval(), cfg, found


@dataclass(frozen=True)
class RunTokenizer:
    """The tokenizer a run's tokens were made with, and the tokens around its documents."""

    path: Path
    tokenizer: Any  # tokenizers.Tokenizer
    eot_id: int | None
    """What ends a document (the model's end-of-sequence token for data of a model's tokenizer)."""
    bos_id: int | None
    """What begins one, where the tokenizer puts one."""
    tokens: dict
    """What the data's meta.json says of its tokens: eos_token, bos_token, chat_template ({}: not recorded)."""


def run_tokenizer(cfg: Config, found: checkpoints.Found, given: Path | None = None) -> RunTokenizer:
    """The run's tokenizer: ``given`` (--tokenizer: a tokenizer.json or a directory holding one,
    which must be the run's where the run recorded its hash), else the tokenizer.json of the
    run's data, found by its hash. One line for what is missing and how to give it."""
    from tokenizers import Tokenizer

    sha = found.state.tokenizer_sha256
    where = f"data.dir={cfg.data.dir}" if cfg.data.dir else "the run's data"
    if given is not None:
        path = given / "tokenizer.json" if given.is_dir() else given
        if not path.is_file():
            raise UserError(f"--tokenizer {given}: no such tokenizer.json")
        if sha is not None and sha256_file(path) != sha:
            raise UserError(
                f"--tokenizer {path} is not the tokenizer {found.path} was trained with (sha256 {sha[:12]}); "
                f"give that one, or leave --tokenizer out to use the one in {where}"
            )
    else:
        path = find_tokenizer(cfg, sha)
        if path is None and sha is None:
            raise UserError(
                f"{found.path} was trained on data without a tokenizer ({where}: nanoGPT's train.bin/val.bin); "
                "give the tokenizer its tokens were made with: --tokenizer PATH (a tokenizer.json, or a directory "
                "holding one), or put it beside the data as tokenizer.json"
            )
        if path is None:
            raise UserError(
                f"the tokenizer of {found.path} ({where}, sha256 {sha[:12]}) is not there any more; give a copy of "
                "it with --tokenizer PATH"
            )
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exceptions for unreadable files
        raise UserError(f"{path} is not a readable tokenizer.json ({e})") from None
    if tokenizer.get_vocab_size() > cfg.model.vocab_size:
        raise UserError(
            f"{path} has {tokenizer.get_vocab_size():,} tokens, more than the model's {cfg.model.vocab_size:,}: "
            "it is not the tokenizer the run was trained with"
        )
    meta = _tokens_recorded_beside(path)
    eot = meta.get("eot_id", tokenizer.token_to_id(EOT))
    tokens = {k: meta[k] for k in ("eos_token", "bos_token", "chat_template") if meta.get(k) is not None}
    return RunTokenizer(path, tokenizer, eot, meta.get("bos_id"), tokens)


def _tokens_recorded_beside(tokenizer_path: Path) -> dict:
    """The meta.json of the dataset a tokenizer.json belongs to (its document tokens), where it
    records this very file ({} otherwise: a tokenizer given on its own)."""
    try:
        meta = json.loads((tokenizer_path.parent / "meta.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return meta if isinstance(meta, dict) and meta.get("tokenizer_sha256") == sha256_file(tokenizer_path) else {}


def load_tokenizer(cfg: Config, found: checkpoints.Found, given: Path | None = None):
    """The run's tokenizer (:func:`run_tokenizer`), the tokenizers object alone."""
    return run_tokenizer(cfg, found, given).tokenizer


@torch.no_grad()
def evaluate(model: Transformer, val: ValData, tokenizer=None) -> dict:
    """Loss, perplexity and (with the tokenizer) bits per byte over ``val``'s windows, summed
    over every rank of the process group (each rank holds its share of the windows)."""
    device = next(model.parameters()).device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, tokens, bytes
    for x, y, *documents in val.batches:  # documents: a run with data.document_mask
        logits = model(x, documents=documents[0]) if documents else model(x)
        totals[0] += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double()
        totals[1] += y.numel()
        if tokenizer is not None:  # the bytes the predicted tokens stand for
            totals[2] += sum(len(text.encode()) for text in tokenizer.decode_batch(y.tolist()))
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss = (totals[0] / totals[1]).item()
    result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(totals[1].item())}
    if tokenizer is not None:
        result["bits_per_byte"] = (totals[0] / (math.log(2) * totals[2])).item()
        result["bytes"] = int(totals[2].item())
    return result
