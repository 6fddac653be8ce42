"""A one-process plain-PyTorch training loop of the same model on the same samples: what the
DeepSpeed engine must reproduce. No DeepSpeed here, on purpose."""

from __future__ import annotations

import torch

from dist_lm.config.io import load_config
from dist_lm.data.sampler import TrainData
from dist_lm.config.batch import BatchSizes
from dist_lm.model.transformer import Transformer
from dist_lm.runtime.optim import lr_at, param_groups
from dist_lm.data.checks import resolve_data


def reference_losses(preset: str, overrides: list[str], steps: int) -> list[float]:
    cfg = load_config(preset, overrides)
    data = resolve_data(cfg)
    cfg, data_dir, meta = data.config, data.dir, data.meta
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    micro = cfg.train.micro_batch_size
    # The whole global batch in this one process, as micro-batches in the global order.
    batch = BatchSizes(micro, cfg.train.global_batch_size // micro, 1)
    data = TrainData(data_dir, meta, cfg.model.seq_len, batch, 0, cfg.train.seed, torch.device("cpu"))
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, o, cfg.train.max_steps)
        batches = data.next_batches()
        total = 0.0
        for x, y in batches:
            loss = model(x, y)
            (loss / len(batches)).backward()
            total += loss.item()
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / len(batches))
    data.close()
    return losses
