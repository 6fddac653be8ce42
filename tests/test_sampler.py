"""The rank-aware sampler: a bijective order, independent of the number of ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dist_lm.config.batch import BatchSizes
from dist_lm.data import shards
from dist_lm.data.sampler import TrainData, ValData, permute


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_permute_is_a_bijection(n):
    out = permute(np.arange(n), n, key=7)
    assert sorted(out.tolist()) == list(range(n))


def test_permute_depends_on_key_and_is_deterministic():
    a, b = permute(np.arange(1000), 1000, key=1), permute(np.arange(1000), 1000, key=2)
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, permute(np.arange(1000), 1000, key=1))


@pytest.fixture
def dataset(tmp_path, cache_dir):
    """A small dataset in our shard format: 3 train shards, numbered tokens, so windows are identifiable."""
    tok = next(cache_dir.glob("embedded-*")) / "tokenizer.json"
    docs = [np.arange(i * 600, (i + 1) * 600) for i in range(6)]
    out = shards.write_dataset(tmp_path / "ds", tok, 4096, {"train": docs, "val": docs[:1]}, shard_tokens=1200)
    return out, shards.read_meta(out)


def rank_reads(dataset, world: int, micro: int, accum: int, steps: int, start: int = 0) -> list[list[int]]:
    """Window ids read by each rank over ``steps`` optimizer steps, per step, concatenated over ranks."""
    out_dir, meta = dataset
    plan = BatchSizes(micro, accum, world)
    per_step: list[list[int]] = [[] for _ in range(steps)]
    for rank in range(world):
        data = TrainData(out_dir, meta, 16, plan, rank, seed=3, device=torch.device("cpu"))
        data.load_state_dict({"samples_consumed": start})
        for s in range(steps):
            batches = data.next_batches()
            assert len(batches) == accum
            # identify a window by its first token
            per_step[s] += [int(x[i, 0]) for x, _ in batches for i in range(len(x))]
        data.close()
    return per_step


def test_union_over_ranks_equals_one_process(dataset):
    one = rank_reads(dataset, world=1, micro=12, accum=1, steps=5)
    for world, micro, accum in [(2, 3, 2), (3, 2, 2), (4, 3, 1)]:
        assert rank_reads(dataset, world, micro, accum, steps=5) == one
    flat = [w for step in one for w in step]
    assert len(set(flat)) == len(flat)  # no sample twice within the epoch


def test_resume_on_another_rank_count_reads_the_next_samples(dataset):
    full = rank_reads(dataset, world=2, micro=2, accum=2, steps=6)
    resumed = rank_reads(dataset, world=4, micro=1, accum=2, steps=3, start=3 * 8)
    assert resumed == full[3:]


def test_epochs_wrap_with_a_new_order(dataset):
    out_dir, meta = dataset
    data = TrainData(out_dir, meta, 16, BatchSizes(1, 1, 1), 0, seed=3, device=torch.device("cpu"))
    n = data.windows.n
    first, second = data.global_ids(0, n), data.global_ids(n, n)
    assert sorted(first) == sorted(second) == list(range(n)) and list(first) != list(second)
    data.close()


def test_windows_do_not_cross_shards(dataset):
    out_dir, meta = dataset
    data = TrainData(out_dir, meta, 16, BatchSizes(1, 1, 1), 0, seed=3, device=torch.device("cpu"))
    # 3 shards of 1200 tokens: (1200 - 1) // 16 = 74 windows each
    assert data.windows.n == 3 * 74
    x = data.windows.gather(np.arange(data.windows.n))
    assert (np.diff(x, axis=1) == 1).all()  # every window is consecutive tokens of one shard
    data.close()


def test_validation_set_is_the_same_for_every_rank_count(dataset):
    out_dir, meta = dataset

    def rows(world):
        got = []
        for r in range(world):
            v = ValData(out_dir, meta, 16, count=7, micro=2, dp_rank=r, dp_size=world, device=torch.device("cpu"))
            got += [int(t) for x, _ in v.batches for t in x[:, 0]]
            assert len(v.batches) + v.padding_batches == math.ceil(math.ceil(7 / world) / 2)
        return got

    assert rows(1) == rows(2) == rows(3) == rows(4)
