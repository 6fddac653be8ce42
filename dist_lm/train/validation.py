"""What the loop measures and shows between its steps: the validation loss over the fixed
validation windows, and a sample of text."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_lm.config.schema import Config
from dist_lm.data.checks import ResolvedData
from dist_lm.data.sampler import ValData
from dist_lm.observe import log
from dist_lm.train.preemption import StopControl
from dist_lm.train.watchdog import Watchdog

Sampler = Callable[..., "list[int]"]
"""dist_lm.use.generate.sample's signature: what prints train.sample_tokens of text, handed in by
the command (the loop sits below the tools that use a trained model)."""


@torch.no_grad()
def validation_loss(
    model_engine: Any, val_data: ValData, device: torch.device, stop: StopControl, watchdog: Watchdog, step: int
) -> float | None:
    """One validation set's mean loss over every rank's share of its windows (a collective), or
    None if a signal came first."""
    totals = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, token count
    # Under sequence parallelism the logits are this rank's share of each window, and so are the
    # targets it scores; the ranks' shares add up to the windows.
    shard = model_engine.module.options.sequence_shard
    # Every rank runs the same number of forward passes (ZeRO-3 forwards are collective): its
    # own batches, then padding. A signal between any two ends the evaluation on all ranks.
    for batch in val_data.batches + [None] * val_data.padding_batches:
        if stop.signalled():
            return None
        watchdog.progress(f"evaluating at step {step}")
        if batch is None:
            model_engine(val_data.filler)
            continue
        x, y, *documents = batch
        logits = model_engine(x, documents=documents[0]) if documents else model_engine(x)
        if shard is not None:
            y = shard.of(y)
        totals[0] += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double()
        totals[1] += y.numel()
    dist.all_reduce(totals)  # sync point
    return (totals[0] / totals[1]).item()


def validation_losses(
    model_engine: Any, val_sets: list, device: torch.device, stop: StopControl, watchdog: Watchdog, step: int
) -> dict[str, tuple[float, float]] | None:
    """Each validation set's (weight, mean loss), the model in eval mode meanwhile; None if a signal
    came first (then on every rank)."""
    model_engine.eval()
    try:
        losses = {}
        for source, val_data in val_sets:
            loss = validation_loss(model_engine, val_data, device, stop, watchdog, step)
            if loss is None:
                return None
            losses[source.name] = (source.weight, loss)
        return losses
    finally:
        model_engine.train()


class Evaluations:
    """A run's evaluations: the best validation loss so far and how many evaluations in a row have
    not improved on it by ``min_delta`` (early stopping; both go into a checkpoint), this process's
    history (the summary line), the newest, and what the last one took (the time limit keeps room
    for the next)."""

    def __init__(self, min_delta: float, patience: int):
        self.min_delta, self.patience = min_delta, patience
        self.best = math.inf
        self.without_improvement = 0
        self.history: list[tuple[int, float]] = []
        self.seconds = 0.0

    def add(self, step: int, loss: float, seconds: float) -> None:
        self.without_improvement = 0 if loss < self.best - self.min_delta else self.without_improvement + 1
        self.best = min(self.best, loss)
        self.history.append((step, loss))
        self.seconds = seconds

    def at(self, step: int) -> float | None:
        """The validation loss of ``step``'s evaluation, if this process made one."""
        return self.history[-1][1] if self.history and self.history[-1][0] == step else None

    def best_or_none(self) -> float | None:
        return self.best if math.isfinite(self.best) else None  # JSON has no infinity

    def patience_exhausted(self) -> bool:
        return bool(self.patience) and self.without_improvement >= self.patience

    def summary(self) -> str | None:
        """The first and the newest of this process's evaluations, for the end of the run's log."""
        if len(self.history) < 2:
            return None
        (first_at, first), (last_at, last) = self.history[0], self.history[-1]
        return (
            f"validation loss {first:.3f} -> {last:.3f} (perplexity {math.exp(first):.1f} -> "
            f"{math.exp(last):.1f}) from step {first_at} to {last_at}"
        )


def sample_text(
    model: torch.nn.Module, sample: Sampler | None, data: ResolvedData, cfg: Config, device: torch.device
) -> str | None:
    """train.sample_tokens of text from ``model`` after train.sample_prompt, decoded with the data's
    tokenizer; None (with a warning) when there is no sampler or no tokenizer to decode with. Every
    rank of a ZeRO-3 job calls it (its forwards are collective)."""
    from tokenizers import Tokenizer

    meta = data.meta
    if sample is None:
        log.warn("no sample: this trainer was given no sampler (dist_lm.use.generate.sample)")
        return None
    if not meta.get("tokenizer"):
        log.warn(f"no sample: {data.dir} has no tokenizer.json to decode with")
        return None
    tokenizer = Tokenizer.from_file(str(data.dir / meta["tokenizer"]))
    eot = meta.get("eot_id")
    prompt = tokenizer.encode(cfg.train.sample_prompt).ids or [eot if eot is not None else 0]
    out = sample(model, prompt, cfg.train.sample_tokens, cfg.model.seq_len, device, seed=cfg.train.seed, stop_id=eot)
    return tokenizer.decode(prompt + out)
