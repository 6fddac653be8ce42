"""Sampling text from a model (full recomputation per token; short samples only)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def sample(model: nn.Module, prompt_ids: list[int], max_new_tokens: int, seq_len: int, device: torch.device,
           temperature: float = 0.8, top_k: int = 50, seed: int = 0) -> list[int]:
    """Continue ``prompt_ids`` by ``max_new_tokens`` sampled tokens (greedy with temperature 0).

    Always runs exactly max_new_tokens forward passes (no early stop), so every rank of a
    ZeRO-3 job, whose forward passes gather parameters together, stays in step.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        logits = model(ids[:, -seq_len:])[:, -1, :].float()
        if temperature == 0:
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            continue
        top = torch.topk(logits / temperature, min(top_k, logits.size(-1)))
        probs = torch.softmax(top.values, dim=-1)
        choice = torch.multinomial(probs, 1, generator=generator)
        ids = torch.cat([ids, top.indices.gather(-1, choice)], dim=1)
    return ids[0, len(prompt_ids):].tolist()
