"""Host memory that an asynchronous save copies its tensors into, kept from one save to the next
(checkpoint.async_save: dist_lm.runtime.engine.StagingEngine, dist_lm.train.async_checkpoint).

Why keep it: a copy into freshly allocated host memory pays for the allocation and a page fault
on every page, and from a GPU it also goes through the driver's pageable path. At 1.13B on one
H100 that held training for 17.8 s of a 20.35 GB save (1.14 GB/s); into these buffers, pinned, a
save after the first held it 0.41 s, and the copy ran at 55 GB/s (docs/benchmarks.md, "Data and
checkpoint throughput").

Why pin with cudaHostRegister rather than ``pin_memory=True``: torch's pinned allocator rounds
each allocation up to a power of two and caches what is freed, so a 9 GB optimizer partition
would hold 16 GB for the rest of the run. Registering ordinary host memory pins exactly its
size, as torch's own checkpoint stager does (torch.distributed.checkpoint._state_dict_stager).
Why not that stager itself: it keys its buffers by the source tensor's storage and copies views
with the whole storage they share, where DeepSpeed's flat buffers make a state dict's tensors
views of much larger ones (what our StagingEngine tells DeepSpeed by not preserving sharing);
and it cannot key the weights that dist_lm.runtime.engine.master_weights gathers afresh at each
save.

The buffers are keyed by what the tensor is in the checkpoint (its file's name and its place in
that file's state dict, or a weight's name), which is the same from one save to the next. A
buffer is reused only by the next save, after the thread that wrote the last one has finished
(dist_lm.train.loop: one save in flight at a time).
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Iterable

import torch


class HostBuffers:
    def __init__(self) -> None:
        self.held: dict[Hashable, torch.Tensor] = {}

    def bytes_to_allocate(self, keyed: Iterable[tuple[Hashable, torch.Tensor]]) -> int:
        """The host memory that copying these tensors would take beyond what is held for them."""
        return sum(t.nbytes for key, t in keyed if not self._fits(key, t))

    def copy(self, key: Hashable, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of ``tensor`` in host memory, in the buffer held for ``key`` (allocated, and
        pinned for a GPU tensor, where there is none of its shape and dtype yet). Blocking: the
        copy is complete when this returns, so the caller may free or change ``tensor``, and
        nothing waits on a stream later (a copy into pinned memory runs at the link's speed
        either way)."""
        if not self._fits(key, tensor):
            self.held.pop(key, None)  # (unpinned as it goes)
            self.held[key] = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
            if tensor.is_cuda and tensor.numel():
                _register(self.held[key])
        buffer = self.held[key]
        buffer.copy_(tensor.detach())
        return buffer

    def _fits(self, key: Hashable, tensor: torch.Tensor) -> bool:
        held = self.held.get(key)
        return held is not None and held.shape == tensor.shape and held.dtype == tensor.dtype


def _register(buffer: torch.Tensor) -> None:
    """Pin ``buffer``'s memory in place for as long as it lives. Where the driver refuses, the
    memory stays ordinary: the copies are slower, not wrong."""
    cudart, pointer = torch.cuda.cudart(), buffer.data_ptr()
    if int(cudart.cudaHostRegister(pointer, buffer.nbytes, 1)) == 0:  # 1: cudaHostRegisterPortable
        # unpinned when the buffer goes; not at exit, when the CUDA context may be gone first
        weakref.finalize(buffer, cudart.cudaHostUnregister, pointer).atexit = False
