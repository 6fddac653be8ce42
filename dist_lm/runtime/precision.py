"""The precision a run trains in: one type that carries its torch dtype, the section of
DeepSpeed's config it enables, and what it costs per parameter. Pure: no deepspeed, no process group.

``parallel.precision`` in the config may say ``auto``; :meth:`Precision.resolve` turns that into
one of these for a device, and the planner asks :meth:`Precision.for_gpu` the same question
about a machine it only describes. Everything past that point holds a ``Precision``.
``Precision`` is a ``str`` enum, so it is written to JSON (state.json, run.json) as its name.
"""

from __future__ import annotations

import enum

import torch

from dist_lm.config.schema import ConfigError
from dist_lm.runtime.hardware import device_name


class Precision(str, enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    FP8 = "fp8"  # bf16 weights and activations; the blocks' matrix products in float8 (dist_lm.runtime.fp8)
    # fp32 weights, gradients and optimizer; the matrix products (and so most activations) in bf16
    # under torch.autocast, which DeepSpeed's "torch_autocast" section turns on around forward.
    BF16_AUTOCAST = "bf16-autocast"

    def __str__(self) -> str:
        return self.value

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the module's weights."""
        return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.bfloat16}.get(self.value, torch.float32)

    @property
    def mixed(self) -> bool:
        """Low-precision weights with fp32 master copies in the optimizer."""
        return self.dtype != torch.float32

    @property
    def bytes_per_weight(self) -> int:
        """Bytes of one parameter as the module holds it."""
        return self.dtype.itemsize

    @property
    def bytes_per_activation(self) -> int:
        """Bytes of one activation element (of those autocast does not keep in fp32)."""
        return 4 if self is Precision.FP32 else 2

    @property
    def autocast(self) -> bool:
        """fp32 weights computed in bf16 under torch.autocast (DeepSpeed's torch_autocast section)."""
        return self is Precision.BF16_AUTOCAST

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype forward computes in under torch.autocast, if it does."""
        return torch.bfloat16 if self.autocast else None

    @property
    def deepspeed_section(self) -> str | None:
        """The section of DeepSpeed's config that this precision enables, "bf16" or "fp16" (None:
        fp32 weights, neither); dist_lm.runtime.ds_config writes it."""
        if not self.mixed:
            return None
        return "bf16" if self is Precision.FP8 else self.value

    @property
    def accumulates_in_fp32(self) -> bool:
        """Gradients are accumulated across micro-batches in fp32 at ZeRO 1-3 (bf16: summing in
        bf16 loses the small contributions, a known cause of divergence), 4 bytes per parameter."""
        return self in (Precision.BF16, Precision.FP8)

    @classmethod
    def for_gpu(cls, has_bf16: bool) -> tuple["Precision", str]:
        """What ``auto`` means on a GPU, and why."""
        if has_bf16:
            return cls.BF16, "the GPU has bf16 tensor cores"
        return cls.FP16, "the GPU has no bf16; fp16 with dynamic loss scaling"

    @classmethod
    def resolve(cls, requested: str, device: torch.device) -> tuple["Precision", str]:
        """The precision to train in on ``device`` for parallel.precision=``requested``, and why."""
        on_gpu = device.type == "cuda"
        has_bf16 = not on_gpu or torch.cuda.is_bf16_supported()
        if requested == "auto":
            if not on_gpu:
                return cls.FP32, "auto: fp32 on CPU"
            precision = cls.for_gpu(has_bf16)[0]
            return precision, (
                f"auto: bf16, supported by {device_name(device)}"
                if precision is cls.BF16
                else f"auto: fp16 with dynamic loss scaling, {device_name(device)} has no bf16"
            )
        if requested == "fp8":
            from dist_lm.runtime.fp8 import check_fp8_device

            check_fp8_device(device)
        if requested in ("bf16", "bf16-autocast") and not has_bf16:
            raise ConfigError(
                "parallel.precision", f"{requested} is not supported by {device_name(device)}; use fp16 or auto"
            )
        return cls(requested), "as configured"
