"""parallel.precision=fp8: the blocks' linear layers multiply in float8 through torchao's
float8 training (convert_to_float8_training), on top of a bf16 run: DeepSpeed keeps bf16
weights with fp32 masters exactly as at bf16; each matrix product casts its inputs to float8
with the recipe's scales (one per tensor, or per row) and accumulates in higher precision.

The embeddings and the output head stay in bf16 (torchao's and the anchors' practice: the head's
logits are where low precision hurts the loss most). The converted layers keep their parameter
names, so checkpoints, the export and every tool read an fp8 run like a bf16 one, and a run may
switch between bf16 and fp8 on resume.
"""

from __future__ import annotations

import importlib.util

import torch

from dist_lm.config.errors import ConfigError, UserError
from dist_lm.runtime.hardware import FP8_CAPABILITY, device_name


def check_fp8_device(device: torch.device) -> None:
    """Refuse fp8 where it cannot run, with one line: a CPU, a GPU without float8 tensor cores,
    torchao not installed."""
    if device.type != "cuda":
        raise ConfigError(
            "parallel.precision",
            "fp8 needs a CUDA GPU of compute capability 8.9 or more (Ada, "
            "Hopper); this run is on the CPU: use bf16 or auto",
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        raise ConfigError(
            "parallel.precision",
            f"fp8 needs a GPU of compute capability 8.9 or more (Ada, Hopper); "
            f"{device_name(device)} has {capability[0]}.{capability[1]}: "
            "use bf16 or auto",
        )
    if importlib.util.find_spec("torchao") is None:
        raise UserError(
            "config error: parallel.precision=fp8 trains through torchao's float8 layers, which is not "
            "installed: pip install torchao (or pip install 'dist-lm[fp8]'), or use bf16"
        )


def converted_layers(model: torch.nn.Module) -> list[str]:
    """The linear layers that multiply in float8: the blocks' layers whose sides are multiples of
    16 (float8 matrix products need them); not the output head, nor the experts' layers that
    DeepSpeed's MoE holds outside the plain blocks' MLP."""
    return [name for name, module in model.named_modules() if _converts(name, module)]


def _converts(fqn: str, module: torch.nn.Module) -> bool:
    if not isinstance(module, torch.nn.Linear) or not fqn.startswith("blocks.") or ".deepspeed_moe." in fqn:
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert(model: torch.nn.Module, recipe: str) -> None:
    """Swap the model's converted_layers for torchao's Float8Linear in place (same parameters,
    same names)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    convert_to_float8_training(
        model,
        config=Float8LinearConfig.from_recipe_name(recipe),
        module_filter_fn=lambda module, fqn: _converts(fqn, module),
    )
