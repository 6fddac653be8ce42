"""Memory-mapped token shards and the rank-aware sampler.

A sample is a window of seq_len + 1 tokens (inputs and targets shifted by one); windows do not
cross shard boundaries and are numbered globally across shards. Each epoch visits every window
once, in an order given by a keyed bijection of [0, n) (a Feistel network with cycle walking),
so no permutation of the corpus is ever materialised.

The order does not depend on the world size: global batch b is the samples at positions
[b * G, (b + 1) * G) of that order, and data-parallel rank r reads its contiguous slice of it.
The whole sampler state is one number, the count of samples consumed, so a run resumes on
any number of ranks with exactly the next samples.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from dist_lm.data.checks import Windows, eval_split
from dist_lm.config.batch import BatchSizes

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a good 64-bit hash, vectorised (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(positions: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """A bijection of [0, n) keyed by ``key``, applied to ``positions`` (all < n).

    A balanced Feistel network permutes [0, 4**h) for the smallest 4**h >= n; values that land
    outside [0, n) are fed through again ("cycle walking"), which keeps it a bijection of [0, n).
    """
    if n <= 1:
        return np.zeros_like(positions, dtype=np.int64)
    half_bits = max(1, (int(n - 1).bit_length() + 1) // 2)
    half_mask = np.uint64((1 << half_bits) - 1)
    keys = [_mix(np.array([key * 1_000_003 + r], dtype=np.uint64))[0] for r in range(rounds)]

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half_bits), x & half_mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & half_mask)
        return (left << np.uint64(half_bits)) | right

    x = np.asarray(positions, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = feistel(x)
        outside = x >= np.uint64(n)
        while outside.any():
            x[outside] = feistel(x[outside])
            outside = x >= np.uint64(n)
    return x.astype(np.int64)


def _to_batches(tokens: np.ndarray, micro: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    t = torch.from_numpy(tokens)
    if device.type == "cuda":
        t = t.pin_memory()  # so the copy below can overlap with compute
    t = t.to(device, non_blocking=True)
    return [(t[i:i + micro, :-1], t[i:i + micro, 1:]) for i in range(0, len(t), micro)]


class TrainData:
    """This rank's micro-batches, step after step, in the world-size independent global order."""

    def __init__(self, data_dir: Path, meta: dict, seq_len: int, batch: BatchSizes, dp_rank: int,
                 seed: int, device: torch.device):
        self.windows = Windows.of_split(data_dir, meta, "train", seq_len)
        self.batch, self.dp_rank, self.seed, self.device = batch, dp_rank, seed, device
        self.samples_consumed = 0
        self.last_ids = np.empty(0, dtype=np.int64)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._next: tuple[int, Future] | None = None

    def global_ids(self, start: int, count: int) -> np.ndarray:
        """Window ids of global sample positions [start, start + count)."""
        pos = np.arange(start, start + count, dtype=np.int64)
        epoch, within = pos // self.windows.n, pos % self.windows.n
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = permute(within[sel], self.windows.n, key=self.seed * 65_537 + int(e))
        return out

    def rank_ids(self, samples_consumed: int) -> np.ndarray:
        """The window ids this rank reads for the global batch starting at samples_consumed."""
        per_rank = self.batch.per_rank_batch_size
        return self.global_ids(samples_consumed + self.dp_rank * per_rank, per_rank)

    def _load(self, samples_consumed: int) -> tuple[np.ndarray, list[tuple[torch.Tensor, torch.Tensor]]]:
        ids = self.rank_ids(samples_consumed)
        return ids, _to_batches(self.windows.gather(ids), self.batch.micro_batch_size, self.device)

    def next_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The micro-batches (inputs, targets) of the next optimizer step; prefetches the one after.
        ``last_ids`` holds the window ids they were cut from."""
        if self._next is not None and self._next[0] == self.samples_consumed:
            self.last_ids, batches = self._next[1].result()
        else:
            self.last_ids, batches = self._load(self.samples_consumed)
        self.samples_consumed += self.batch.global_batch_size
        self._next = (self.samples_consumed, self._pool.submit(self._load, self.samples_consumed))
        return batches

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed}

    def load_state_dict(self, state: dict) -> None:
        self.samples_consumed = int(state["samples_consumed"])
        self._next = None

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class ValData:
    """A fixed set of validation windows (the first ``count``), split contiguously over ranks.

    The same windows for every rank count: each rank reports its loss sum and token count,
    and the all-reduced mean is the same number whatever the split. Ranks with fewer batches
    than the most loaded one run ``padding_batches`` forward passes on ``filler`` whose results
    are discarded, because under ZeRO-3 every forward pass is a collective.
    """

    def __init__(self, data_dir: Path, meta: dict, seq_len: int, count: int, micro: int,
                 dp_rank: int, dp_size: int, device: torch.device):
        split = eval_split(meta)
        windows = Windows.of_split(data_dir, meta, split, seq_len)
        ids = np.arange(min(count, windows.n), dtype=np.int64)
        mine = np.array_split(ids, dp_size)[dp_rank]
        self.batches = _to_batches(windows.gather(mine), micro, device) if len(mine) else []
        most = math.ceil(math.ceil(len(ids) / dp_size) / micro)
        self.padding_batches = most - len(self.batches)
        self.filler = torch.from_numpy(windows.gather(ids[:1])[:, :-1]).to(device)
        self.split = split
