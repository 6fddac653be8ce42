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

from dist_lm.config.batch import BatchSizes
from dist_lm.data.checks import Windows, eval_split
from dist_lm.model.documents import document_ids

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
    # mod 2**64: the same keys as before for every seed whose product fits, and any seed works
    keys = [_mix(np.array([(key * 1_000_003 + r) % 2**64], dtype=np.uint64))[0] for r in range(rounds)]

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


def _to_batches(tokens: np.ndarray, micro: int, device: torch.device, eot_id: int | None = None) -> list[tuple]:
    """Micro-batches (inputs, targets), and with ``eot_id`` (data.document_mask) each input
    token's document as a third tensor (dist_lm.model.documents)."""
    t = torch.from_numpy(tokens)
    if device.type == "cuda":
        t = t.pin_memory()  # so the copy below can overlap with compute
    t = t.to(device, non_blocking=True)
    batches = [(t[i : i + micro, :-1], t[i : i + micro, 1:]) for i in range(0, len(t), micro)]
    if eot_id is None:
        return batches
    return [(x, y, document_ids(x, eot_id)) for x, y in batches]


# frac(n x golden ratio) in 64-bit fixed point: the Weyl sequence that assigns mixture samples to
# sources. Its points spread evenly over [0, 1) for any stretch of positions, so each source gets
# its weight's share of every 1,000 consecutive samples to within a few samples, and the source
# of a position is a function of the position alone.
GOLDEN = np.uint64(0x9E3779B97F4A7C15)


class TrainData:
    """This rank's micro-batches, step after step, in the world-size independent global order.

    One dataset, or a mixture (:meth:`mixture`): then global position n belongs to the source
    whose share of [0, 1) holds frac((n + 1) x golden ratio), and is that source's next sample
    in its own keyed order. The state is then also each source's count of samples consumed, so
    a resume continues every source where it stopped, on any number of ranks, also with other
    weights: from the resume on, positions are assigned by the new weights."""

    def __init__(
        self,
        data_dir: Path,
        meta: dict,
        seq_len: int,
        batch: BatchSizes,
        dp_rank: int,
        seed: int,
        device: torch.device,
        weights: list[float] | None = None,
        more: list[tuple[Path, dict]] = (),
        eot_id: int | None = None,
    ):
        """One dataset; ``more`` and ``weights`` (one per dataset, the first included) make it a
        mixture (use :meth:`mixture`). ``eot_id``: batches carry each token's document."""
        self.eot_id = eot_id
        self.source_windows = [Windows.of_split(d, m, "train", seq_len) for d, m in [(data_dir, meta), *more]]
        self.windows = self.source_windows[0]
        weights = np.asarray(weights or [1.0], dtype=np.float64)
        self.thresholds = (np.cumsum(weights / weights.sum())[:-1] * 2.0**64).astype(np.uint64)
        self.batch, self.dp_rank, self.seed, self.device = batch, dp_rank, seed, device
        self.samples_consumed = 0
        self.source_samples = np.zeros(len(self.source_windows), dtype=np.int64)
        self.last_ids = np.empty(0, dtype=np.int64)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._next: tuple[int, Future] | None = None

    @classmethod
    def mixture(
        cls,
        sources: list[tuple[Path, dict, float]],
        seq_len: int,
        batch: BatchSizes,
        dp_rank: int,
        seed: int,
        device: torch.device,
        eot_id: int | None = None,
    ) -> "TrainData":
        (first_dir, first_meta, _), *more = sources
        return cls(
            first_dir,
            first_meta,
            seq_len,
            batch,
            dp_rank,
            seed,
            device,
            [w for _, _, w in sources],
            [(d, m) for d, m, _ in more],
            eot_id,
        )

    def _source_ids(self, source: int, ks: np.ndarray) -> np.ndarray:
        """Window ids of the samples ``ks`` (counted from 0) of one source's own order."""
        n = self.source_windows[source].n
        epoch, within = ks // n, ks % n
        out = np.empty(len(ks), dtype=np.int64)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = permute(within[sel], n, key=self.seed * 65_537 + int(e) + source * 1_000_003)
        return out

    def assign(self, start: int, count: int, before: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, window id) of global positions [start, start + count), given each source's
        samples before ``start``."""
        if len(self.source_windows) == 1:
            return np.zeros(count, dtype=np.int64), self._source_ids(0, np.arange(start, start + count, dtype=np.int64))
        with np.errstate(over="ignore"):
            u = (np.arange(start, start + count, dtype=np.uint64) + np.uint64(1)) * GOLDEN
        sources = np.searchsorted(self.thresholds, u, side="right").astype(np.int64)
        ids = np.empty(count, dtype=np.int64)
        for s in np.unique(sources):
            sel = sources == s
            ids[sel] = self._source_ids(int(s), before[s] + np.arange(int(sel.sum()), dtype=np.int64))
        return sources, ids

    def global_ids(self, start: int, count: int) -> np.ndarray:
        """Window ids of global positions [start, start + count) of one dataset's order."""
        return self.assign(start, count, np.array([start]))[1]

    def _encoded(self, sources: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """One id per sample: the window id, or in a mixture window x sources + source."""
        return ids if len(self.source_windows) == 1 else ids * len(self.source_windows) + sources

    def rank_ids(self, samples_consumed: int, before: np.ndarray | None = None) -> np.ndarray:
        """The sample ids this rank reads for the global batch starting at samples_consumed."""
        before = np.array([samples_consumed]) if before is None else before
        sources, ids = self._rank_samples(samples_consumed, before)
        return self._encoded(sources, ids)

    def _rank_samples(self, samples_consumed: int, before: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Every rank assigns the whole global batch (cheap), so each source's count before its
        # own slice is known, then takes its slice.
        sources, ids = self.assign(samples_consumed, self.batch.global_batch_size, before)
        per_rank = self.batch.per_rank_batch_size
        mine = slice(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank)
        return sources[mine], ids[mine]

    def _load(self, samples_consumed: int, before: np.ndarray) -> tuple[np.ndarray, list]:
        sources, ids = self._rank_samples(samples_consumed, before)
        tokens = np.empty((len(ids), self.windows.seq_len + 1), dtype=np.int64)
        for s in np.unique(sources):
            sel = sources == s
            tokens[sel] = self.source_windows[int(s)].gather(ids[sel])
        return self._encoded(sources, ids), _to_batches(tokens, self.batch.micro_batch_size, self.device, self.eot_id)

    def _after(self, samples_consumed: int, before: np.ndarray) -> np.ndarray:
        """Each source's samples consumed after the global batch at samples_consumed."""
        if len(self.source_windows) == 1:
            return before + self.batch.global_batch_size
        sources, _ = self.assign(samples_consumed, self.batch.global_batch_size, before)
        return before + np.bincount(sources, minlength=len(self.source_windows))

    def next_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The micro-batches (inputs, targets) of the next optimizer step; prefetches the one after.
        ``last_ids`` holds the sample ids they were cut from."""
        if self._next is not None and self._next[0] == self.samples_consumed:
            self.last_ids, batches = self._next[1].result()
        else:
            self.last_ids, batches = self._load(self.samples_consumed, self.source_samples)
        self.source_samples = self._after(self.samples_consumed, self.source_samples)
        self.samples_consumed += self.batch.global_batch_size
        self._next = (self.samples_consumed, self._pool.submit(self._load, self.samples_consumed, self.source_samples))
        return batches

    def state_dict(self) -> dict:
        state = {"samples_consumed": self.samples_consumed}
        if len(self.source_windows) > 1:
            state["source_samples"] = self.source_samples.tolist()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Where the order continues. A checkpoint of another set of sources (a resume with
        checkpoint.allow_data_change) starts each source from its beginning."""
        self.samples_consumed = int(state["samples_consumed"])
        counts = state.get("source_samples", [self.samples_consumed])
        if len(counts) != len(self.source_windows):
            counts = [0] * len(self.source_windows)
        self.source_samples = np.asarray(counts, dtype=np.int64)
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

    def __init__(
        self,
        data_dir: Path,
        meta: dict,
        seq_len: int,
        count: int,
        micro: int,
        dp_rank: int,
        dp_size: int,
        device: torch.device,
        eot_id: int | None = None,
    ):
        split = eval_split(meta)
        windows = Windows.of_split(data_dir, meta, split, seq_len)
        ids = np.arange(min(count, windows.n), dtype=np.int64)
        mine = np.array_split(ids, dp_size)[dp_rank]
        self.batches = _to_batches(windows.gather(mine), micro, device, eot_id) if len(mine) else []
        most = math.ceil(math.ceil(len(ids) / dp_size) / micro)
        self.padding_batches = most - len(self.batches)
        self.filler = torch.from_numpy(windows.gather(ids[:1])[:, :-1]).to(device)
        self.split = split
