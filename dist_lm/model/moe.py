"""The mixture-of-experts MLP: DeepSpeed's MoE layer, in the shape the transformer expects of an MLP.

The one place the model reaches into DeepSpeed, and only when model.layer_types asks for moe:
DeepSpeed's layer is the expert-parallel implementation (its all-to-all over the expert groups,
its expert checkpoint files), which this project uses rather than rebuilds. The transformer
takes the layer from outside (``Transformer(cfg, moe_layer=...)``), so a model without experts
never imports it.
"""

from __future__ import annotations

import torch

from dist_lm.config.schema import ConfigError, ModelConfig, ParallelConfig
from dist_lm.model.layers import MLP
from dist_lm.model.transformer import Transformer


class ExpertsMLP(torch.nn.Module):
    """DeepSpeed's MoE layer in the shape the model expects of an MLP: it returns the output and
    keeps the load-balancing loss of its last forward in ``aux_loss``."""

    @staticmethod
    def parameter_count(cfg: ModelConfig) -> int:
        """n_experts MLPs and the router (d_model x n_experts)."""
        return cfg.n_experts * MLP.parameter_count(cfg) + cfg.d_model * cfg.n_experts

    @staticmethod
    def active_parameter_count(cfg: ModelConfig) -> int:
        """What one token passes through: the router and top_k of the experts."""
        return cfg.moe_top_k * MLP.parameter_count(cfg) + cfg.d_model * cfg.n_experts

    def __init__(self, model: ModelConfig, parallel: ParallelConfig):
        super().__init__()
        from deepspeed.moe.layer import MoE  # only a model with experts needs DeepSpeed here

        self.moe = MoE(
            hidden_size=model.d_model,
            expert=MLP(model),
            num_experts=model.n_experts,
            ep_size=parallel.expert_parallel_size,
            k=model.moe_top_k,
            capacity_factor=model.moe_capacity_factor,
            eval_capacity_factor=model.moe_capacity_factor,
            min_capacity=4,
            drop_tokens=True,
        )
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, self.aux_loss, _ = self.moe(x)
        return out


def check_moe(model: ModelConfig, parallel: ParallelConfig, world_size: int) -> None:
    """What DeepSpeed's MoE layer needs, checked before any process starts."""
    if "moe" not in model.layer_types:
        return
    if parallel.zero_stage == 3:
        raise ConfigError(
            "parallel.zero_stage",
            "DeepSpeed's MoE layer (model.layer_types with moe) works at "
            "ZeRO stages 0-2, not 3; use parallel.zero_stage=2",
        )
    for n, what in ((model.n_experts, "model.n_experts"), (world_size, "the rank count")):
        if n % parallel.expert_parallel_size:
            raise ConfigError(
                "parallel.expert_parallel_size", f"{parallel.expert_parallel_size} must divide {what} ({n})"
            )


def build_model(model: ModelConfig, parallel: ParallelConfig) -> Transformer:
    """The model, with DeepSpeed's MoE layers where model.layer_types says moe."""
    return Transformer(model, moe_layer=lambda _: ExpertsMLP(model, parallel))
