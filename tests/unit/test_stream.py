"""The webdataset loader delivers exactly the plan, from any start step, on any worker count."""

from itertools import islice

import numpy as np
import pytest

from dist_train.data.evalsets import read_samples, set_size
from dist_train.data.manifest import read_manifest
from dist_train.data.mixture import Mixture
from dist_train.data.plan import PlanSpec, rank_step_samples
from dist_train.data.stream import Prefetcher, pretrain_batches, read_shard


def all_samples(man):
    return {(i, k): arr for i, s in enumerate(man.train)
            for k, arr in enumerate(read_shard(man.path(s), samples=s.samples))}


@pytest.mark.parametrize("window", [1, 2])
def test_loader_follows_the_plan_across_epochs_and_resumes_exactly(shards_dir, window):
    man = read_manifest(shards_dir)
    table = all_samples(man)
    spec = PlanSpec(tuple(s.samples for s in man.train), lanes=2, global_batch=8, seed=3, window_shards=window)
    steps = 2 * sum(spec.sizes) // 8 + 3  # crosses into a third epoch
    for rank in range(2):
        got = list(islice(pretrain_batches([man], Mixture.of(spec), world_size=2, rank=rank, start_step=0), steps))
        for step, (rows, ids, _) in enumerate(got):
            want = rank_step_samples(spec, step, 2, rank)
            assert ids == [(0, s, k) for s, k in want]
            np.testing.assert_array_equal(rows, np.stack([table[p] for p in want]))
        resumed = list(islice(pretrain_batches([man], Mixture.of(spec), world_size=2, rank=rank, start_step=7), 5))
        for (a, ia, _), (b, ib, _) in zip(resumed, got[7:12], strict=True):
            np.testing.assert_array_equal(a, b)
            assert ia == ib


def test_dataloader_workers_deliver_the_same_batches(shards_dir):
    man = read_manifest(shards_dir)
    spec = PlanSpec(tuple(s.samples for s in man.train), lanes=4, global_batch=8, seed=1)
    plain = list(islice(pretrain_batches([man], Mixture.of(spec), world_size=2, rank=1, start_step=3), 30))
    it = pretrain_batches([man], Mixture.of(spec), world_size=2, rank=1, start_step=3, loader_workers=2)
    workers = list(islice(it, 30))
    for (a, ia, _), (b, ib, _) in zip(plain, workers, strict=True):
        np.testing.assert_array_equal(a, b)
        assert ia == ib


def test_eval_samples_are_the_first_ones_whatever_the_worker_count(shards_dir):
    """An evaluation set is its first `limit` held-out samples; ranks split them without overlap or gap."""
    man = read_manifest(shards_dir)
    size = set_size(man, 5)
    assert size == 5 and set_size(man, 0) == sum(s.samples for s in man.validation)
    whole = dict(read_samples(man, set(range(size)), size))
    assert sorted(whole) == list(range(5))
    for world in (1, 2, 3):
        parts = [dict(read_samples(man, set(range(r, size, world)), size)) for r in range(world)]
        merged = {i: row for part in parts for i, row in part.items()}
        assert sorted(merged) == list(range(5))
        for i, row in merged.items():
            np.testing.assert_array_equal(row, whole[i])


def test_prefetcher_passes_items_and_errors():
    assert list(Prefetcher(iter(range(5)))) == [0, 1, 2, 3, 4]

    def boom():
        yield 1
        raise ValueError("bad shard")

    it = Prefetcher(boom())
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad shard"):
        next(it)
