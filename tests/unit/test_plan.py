"""The sample plan as a pure function: deterministic, worker-count independent, no sample twice."""

import pytest

from dist_train.data.manifest import DataError
from dist_train.data.plan import lanes_for_epoch, locate, rank_lanes, rank_step_samples, steps_in_epoch

SIZES = (40, 40, 40, 40, 40, 40, 40, 17)  # the last shard is short, as data build leaves it


def global_step(step, world, lanes=4, batch=8, seed=0):
    return [s for r in range(world) for s in rank_step_samples(step, SIZES, lanes, batch, seed, world, r)]


def test_global_order_does_not_depend_on_worker_count():
    for step in (0, 1, 5, 30, 41):
        assert global_step(step, 1) == global_step(step, 2) == global_step(step, 4)


def test_epoch_has_no_duplicates_and_each_shard_belongs_to_one_rank():
    n = steps_in_epoch(SIZES, 4, 8, 0, 0)
    seen = [s for step in range(n) for s in global_step(step, 2)]
    assert len(seen) == len(set(seen)) == n * 8
    owner = {}
    for step in range(n):
        for rank in range(2):
            for shard, _ in rank_step_samples(step, SIZES, 4, 8, 0, 2, rank):
                assert owner.setdefault(shard, rank) == rank


def test_epochs_reshuffle_and_are_deterministic():
    assert lanes_for_epoch(SIZES, 4, 0, 0) == lanes_for_epoch(SIZES, 4, 0, 0)
    assert lanes_for_epoch(SIZES, 4, 0, 0) != lanes_for_epoch(SIZES, 4, 0, 1)
    assert global_step(0, 2, seed=1) != global_step(0, 2, seed=0)
    n0 = steps_in_epoch(SIZES, 4, 8, 0, 0)
    assert locate(n0, SIZES, 4, 8, 0) == (1, 0)
    assert locate(n0 - 1, SIZES, 4, 8, 0) == (0, n0 - 1)


def test_rank_lanes_are_contiguous_blocks():
    assert [list(rank_lanes(8, 4, r)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_too_little_data_is_an_error():
    with pytest.raises(DataError, match="cannot fill 16 lanes"):
        locate(0, SIZES, 16, 16, 0)
    with pytest.raises(DataError, match="gives no step"):
        locate(0, (3, 3), 2, 16, 0)
