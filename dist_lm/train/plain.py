"""The same training in plain PyTorch, in one process and without DeepSpeed: the tests'
reference for the engine's losses (tests/reference.py) and the bench's baseline for its speed
(dist_lm.commands.bench).

It starts as a run starts (the seed and so the initial weights, AdamW's betas, eps and
weight-decay groups, the samples in the global order) and sets every step's learning rate by the
run's schedule, so the engine and it train the same weights. For the bench that is more than
tidiness: at 1.3B an H200 trains at its power cap, where the clock moves with the power the
matmuls draw, and that depends on the values they multiply; a baseline at another learning rate
ran at another clock (docs/benchmarks.md, "Speed against plain PyTorch")."""

from __future__ import annotations

import time

import torch

from dist_lm.config.batch import batch_sizes
from dist_lm.config.schema import Config
from dist_lm.data.checks import resolve_data
from dist_lm.data.sampler import TrainData
from dist_lm.model.loss import TrainingOptions
from dist_lm.model.transformer import Transformer
from dist_lm.runtime.optim import fused_adamw, lr_at, param_groups


class PlainTraining:
    """``cfg``'s model trained on one device, the whole global batch as micro-batches in this
    process. ``compiled``: through torch.compile; ``autocast``: under bf16 autocast (fp32 weights)."""

    def __init__(self, cfg: Config, device: torch.device, compiled: bool = False, autocast: bool = False):
        data = resolve_data(cfg)
        self.cfg = cfg = data.config
        torch.manual_seed(cfg.train.seed)  # as dist_lm.train.session seeds before building the model
        self.model = Transformer(cfg.model, options=TrainingOptions(z_loss_coef=cfg.optim.z_loss)).to(device)
        self.optimizer = fused_adamw(param_groups(self.model, cfg.optim.weight_decay), cfg.optim)
        self.forward = torch.compile(self.model) if compiled else self.model
        self.autocast = autocast
        self.data = TrainData(
            data.dir, data.meta, cfg.model.seq_len, batch_sizes(cfg.train, 1), 0, cfg.train.seed, device
        )
        self.steps_done = 0
        self.data_wait_s = 0.0
        """Seconds spent waiting for the sampler's batches, summed over the steps."""

    def step(self) -> list[torch.Tensor]:
        """One optimizer step; each micro-batch's cross-entropy (what the training log reports),
        left on the device (reading it would wait for the GPU)."""
        optim = self.cfg.optim
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.steps_done, optim, self.cfg.train.max_steps)
        start = time.perf_counter()
        batches = self.data.next_batches()
        self.data_wait_s += time.perf_counter() - start
        losses = []
        for x, y in batches:
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss = self.forward(x, y)
            (loss.total / len(batches)).backward()
            losses.append(loss.cross_entropy.detach())
        if optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        return losses

    def close(self) -> None:
        self.data.close()
