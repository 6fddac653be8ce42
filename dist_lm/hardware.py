"""What this machine's accelerator can do: precision support and dense peak FLOP/s for MFU."""

from __future__ import annotations

import torch

from dist_lm.config import ConfigError

# Dense (no sparsity) bf16/fp16 tensor-core peak FLOP/s per GPU, from the vendors' data sheets.
# Matched against torch.cuda.get_device_name(); the first substring that matches wins, so the
# more specific names come first. A card that is not here gets no MFU rather than a guessed one.
PEAK_FLOPS_BF16: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 6000 Ada", 364e12),
    ("RTX A6000", 155e12),
    ("RTX 5090", 209e12),
    ("RTX 5080", 113e12),
    ("RTX 4090", 165e12),
    ("RTX 4080", 97e12),
    ("RTX 4070 Ti", 80e12),
    ("RTX 4070", 58e12),
    ("RTX 4060 Ti", 44e12),
    ("RTX 3090 Ti", 80e12),
    ("RTX 3090", 71e12),
    ("RTX 3080 Ti", 68e12),
    ("RTX 3080", 60e12),
    ("RTX 3070", 41e12),
    ("RTX 3060", 25e12),
    ("V100", 125e12),  # fp16 only
    ("T4", 65e12),  # fp16 only
]


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16/fp16 peak FLOP/s of the device, or None (CPU, or a card not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS_BF16:
        if key in name:
            return flops
    return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """The precision to train in and why: (precision, reason)."""
    bf16_ok = device.type == "cpu" or torch.cuda.is_bf16_supported()
    if requested == "auto":
        if device.type == "cpu":
            return "fp32", "auto: fp32 on CPU"
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: bf16, supported by {device_name(device)}"
        return "fp16", f"auto: fp16 with dynamic loss scaling, {device_name(device)} has no bf16"
    if requested == "bf16" and not bf16_ok:
        raise ConfigError("parallel.precision", f"bf16 is not supported by {device_name(device)}; use fp16 or auto")
    return requested, "as configured"
