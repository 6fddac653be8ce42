"""Sampling text from a model: a key/value cache (each new token costs one token's forward),
temperature, top-k and top-p (nucleus) sampling, greedy with temperature 0, and a stop token."""

from __future__ import annotations

import torch
from torch import nn

from dist_lm.model.layers import KVCache


@torch.no_grad()
def sample(
    model: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    seq_len: int,
    device: torch.device,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 1.0,
    seed: int = 0,
    stop_id: int | None = None,
    use_cache: bool = True,
) -> list[int]:
    """Continue ``prompt_ids`` by up to ``max_new_tokens`` tokens (fewer at ``stop_id``, which
    is not returned, or when the context of ``seq_len`` tokens is full).

    Without the cache every token recomputes the whole context: the same tokens, slower (the
    test compares the two). Every rank of a ZeRO-3 job must call this with the same arguments:
    its forward passes gather parameters together, so all ranks run the same number of them.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = list(prompt_ids)
    cache = KVCache() if use_cache else None
    pending = torch.tensor([ids], dtype=torch.long, device=device)  # what the model has not seen yet
    out: list[int] = []
    for _ in range(max_new_tokens):
        if len(ids) >= seq_len:
            break
        logits = (
            model(pending, cache=cache)[:, -1, :].float()
            if use_cache
            else model(torch.tensor([ids], dtype=torch.long, device=device))[:, -1, :].float()
        )
        token = pick(logits[0], temperature, top_k, top_p, generator)
        if token == stop_id:
            break
        ids.append(token)
        out.append(token)
        pending = torch.tensor([[token]], dtype=torch.long, device=device)
    return out


def pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator) -> int:
    """One token from a vector of logits."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], float("-inf"))
    if top_p < 1.0:  # the smallest set of tokens whose probabilities add up to top_p
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
