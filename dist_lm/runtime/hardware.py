"""What this machine has: GPUs (count, name, memory, compute capability), CPU cores and RAM;
what its GPUs can do (bf16, dense peak FLOP/s for MFU).

DIST_LM_GPU_MEMORY_GB=12 makes a larger GPU act as one of 12 GB: the planner sees 12 GB and
every rank's allocator is capped there (torch.cuda.set_per_process_memory_fraction), so a plan
for a small card can be proven on a large one (docs/planner.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil
import torch

from dist_lm.config.errors import UserError

MEMORY_CAP_VARIABLE = "DIST_LM_GPU_MEMORY_GB"
FP8_CAPABILITY = (8, 9)  # float8 tensor cores: Ada and Hopper onwards
# By name, for a machine described without its compute capability (dist-lm plan --gpu-name).
FP8_GPUS = ("H100", "H200", "H800", "GH200", "B200", "B100", "L40", "L4", "RTX 40", "RTX 50", "Ada")
NO_FP8_GPUS = ("A100", "A800", "A10", "A30", "A40", "V100", "T4", "P100", "RTX 30", "RTX 20", "RTX A")


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
    ("RTX 3060 Ti", 32e12),
    ("RTX 3060", 25e12),
    ("RTX A5000", 111e12),
    ("RTX A4000", 77e12),
    ("A40", 150e12),
    ("A30", 165e12),
    ("V100", 125e12),  # fp16 only
    ("T4", 65e12),  # fp16 only
]


def peak_flops_for(gpu_name: str) -> float | None:
    """Dense bf16/fp16 peak FLOP/s of a GPU by its name, or None for a card not in the table."""
    for key, flops in PEAK_FLOPS_BF16:
        if key in gpu_name:
            return flops
    return None


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16/fp16 peak FLOP/s of the device, or None (CPU, or a card not in the table)."""
    return peak_flops_for(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


@dataclass(frozen=True)
class Machine:
    """The hardware a run gets: this machine as detected, or one described for planning."""

    gpus_per_node: int
    """GPUs per node; 0 on a CPU-only machine."""
    gpu_name: str = ""
    gpu_mem_gb: float = 0.0
    """Memory of one GPU, in GB (1e9 bytes)."""
    compute_capability: tuple[int, int] | None = None
    nodes: int = 1
    cpu_cores: int = 1
    """Usable CPU cores per node."""
    ram_gb: float = 0.0
    """RAM per node, in GB."""

    @property
    def has_gpu(self) -> bool:
        return self.gpus_per_node > 0

    @property
    def world_size(self) -> int:
        """Ranks in a run: one per GPU, or one process on a CPU machine."""
        return self.gpus_per_node * self.nodes if self.has_gpu else 1

    @property
    def bf16(self) -> bool:
        """bf16 tensor cores arrived with Ampere (compute capability 8.0)."""
        if self.compute_capability is not None:
            return self.compute_capability >= (8, 0)
        return not any(old in self.gpu_name for old in ("V100", "T4", "P100", "RTX 20"))

    @property
    def fp8(self) -> bool | None:
        """Float8 tensor cores (compute capability 8.9 on); None: the name does not tell."""
        if self.compute_capability is not None:
            return self.compute_capability >= FP8_CAPABILITY
        if any(new in self.gpu_name for new in FP8_GPUS):
            return True
        return False if any(old in self.gpu_name for old in NO_FP8_GPUS) else None

    @property
    def peak_flops(self) -> float | None:
        return peak_flops_for(self.gpu_name) if self.has_gpu else None

    def describe(self) -> str:
        host = f"{self.cpu_cores} CPU cores, {self.ram_gb:.0f} GB RAM"
        if not self.has_gpu:
            return f"no GPU; {host}" + (f"; {self.nodes} nodes" if self.nodes > 1 else "")
        cc = (
            f", compute capability {self.compute_capability[0]}.{self.compute_capability[1]}"
            if self.compute_capability
            else ""
        )
        per_node = f"{self.gpus_per_node} x {self.gpu_name or 'GPU'} ({self.gpu_mem_gb:.0f} GB{cc})"
        return f"{self.nodes} node(s) of {per_node}; {host} per node"


def detect_machine(nodes: int = 1) -> Machine:
    """This node's GPUs, cores and RAM; ``nodes`` comes from the launcher (dist_lm.runtime.distributed)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ram_gb = psutil.virtual_memory().total / 1e9
    if not torch.cuda.is_available():
        return Machine(0, nodes=nodes, cpu_cores=cores, ram_gb=ram_gb)
    props = torch.cuda.get_device_properties(0)
    memory_gb = min(props.total_memory / 1e9, gpu_memory_cap_gb() or float("inf"))
    return Machine(torch.cuda.device_count(), props.name, memory_gb, (props.major, props.minor), nodes, cores, ram_gb)


def gpu_memory_cap_gb() -> float | None:
    """The GB that DIST_LM_GPU_MEMORY_GB caps each GPU to, or None when it is not set."""
    text = os.environ.get(MEMORY_CAP_VARIABLE, "").strip()
    if not text:
        return None
    try:
        cap = float(text)
    except ValueError:
        cap = 0.0
    if not cap > 0:
        raise UserError(
            f"launch environment: {MEMORY_CAP_VARIABLE}={text!r} is not a positive number of GB; "
            f"set it to the memory of the GPU to act as (e.g. 12), or unset it"
        )
    return cap


def apply_gpu_memory_cap(device: torch.device) -> str:
    """Cap this process's allocator on ``device`` to DIST_LM_GPU_MEMORY_GB; a line saying so, or ""."""
    cap = gpu_memory_cap_gb()
    if cap is None or device.type != "cuda":
        return ""
    total = torch.cuda.get_device_properties(device).total_memory / 1e9
    if cap >= total:
        return f"{MEMORY_CAP_VARIABLE}={cap:g} is not below the GPU's {total:.0f} GB: no cap"
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    return f"GPU memory capped at {cap:g} GB of {total:.0f} GB ({MEMORY_CAP_VARIABLE}): an allocation past it fails"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def bind_cores(local_rank: int, local_world_size: int) -> list[int]:
    """Give this rank its own slice of the node's cores (and as many torch threads): with the
    optimizer offloaded, every rank's CPU Adam runs at once, and overlapping thread pools thrash.
    Returns the cores bound, or [] when there are fewer cores than ranks (left as it is)."""
    cores = sorted(os.sched_getaffinity(0))
    per_rank = len(cores) // max(local_world_size, 1)
    if per_rank < 1:
        return []
    mine = cores[local_rank * per_rank : (local_rank + 1) * per_rank]
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(len(mine))
    return mine


# The share of a node's memory a staged checkpoint leaves free. A copy that pushed the node past
# it would risk the kernel's OOM killer, which ends a rank without a line: such a state dict is
# written in place instead, holding training as a synchronous save does.
HOST_MEMORY_RESERVE = 0.10


def host_memory_for(nbytes: int) -> bool:
    """Whether this node can take ``nbytes`` more of host memory and keep its reserve."""
    memory = psutil.virtual_memory()
    return memory.available - nbytes >= HOST_MEMORY_RESERVE * memory.total
