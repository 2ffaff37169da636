"""The sample plan as a pure function: deterministic, worker-count independent, no sample twice."""

import pytest

from dist_train.data.manifest import DataError
from dist_train.data.plan import (
    PlanSpec,
    epoch_lanes,
    epoch_length,
    epoch_start,
    first_step_of_epoch,
    locate,
    rank_lanes,
    rank_step_samples,
    step_epoch,
)

SIZES = (40, 40, 40, 40, 40, 40, 40, 17)  # the last shard is short, as data build leaves it
SPEC = PlanSpec(SIZES, lanes=4, global_batch=8, seed=0, window_shards=1)


def global_step(spec, step, world):
    return [s for r in range(world) for s in rank_step_samples(spec, step, world, r)]


@pytest.mark.parametrize("window", [1, 2])
def test_global_order_does_not_depend_on_worker_count(window):
    spec = PlanSpec(SIZES, 4, 8, 0, window)
    for step in (0, 1, 5, 30, 41, 77):
        assert global_step(spec, step, 1) == global_step(spec, step, 2) == global_step(spec, step, 4)


@pytest.mark.parametrize("window", [1, 2, 3])
def test_every_epoch_is_exactly_once_and_each_shard_has_one_reader(window):
    spec = PlanSpec(SIZES, 4, 8, 3, window)
    per_lane_epoch = epoch_length(spec, 0)
    positions = per_lane_epoch * 4
    seen = [s for step in range(positions // 8) for s in global_step(spec, step, 2)]
    assert len(seen) == len(set(seen)) == (positions // 8) * 8
    owner = {}
    for step in range(positions // 8):
        for rank in range(2):
            for shard, _ in rank_step_samples(spec, step, 2, rank):
                assert owner.setdefault(shard, rank) == rank


def test_window_shuffles_within_bounds():
    one = global_step(SPEC, 0, 1)
    lanes = epoch_lanes(SPEC, 0)
    # a step draws k=2 samples from the first window (= first shard) of each lane, not in file order
    assert [s for s, _ in one] == [lane[0] for lane in lanes for _ in range(2)]
    firsts = [global_step(SPEC, step, 1)[0] for step in range(20)]
    assert [k for _, k in firsts] != sorted(k for _, k in firsts)


def test_epochs_reshuffle_and_are_deterministic():
    assert epoch_lanes(SPEC, 0) == epoch_lanes(PlanSpec(SIZES, 4, 8, 0), 0)
    assert epoch_lanes(SPEC, 0) != epoch_lanes(SPEC, 1)
    assert global_step(PlanSpec(SIZES, 4, 8, 1), 0, 2) != global_step(SPEC, 0, 2)
    n0 = epoch_length(SPEC, 0)
    assert locate(SPEC, n0) == (1, 0) and locate(SPEC, n0 - 1) == (0, n0 - 1)
    assert epoch_start(SPEC, 2) == n0 + epoch_length(SPEC, 1)
    assert step_epoch(SPEC, first_step_of_epoch(SPEC, 2) + 1) == 2


def test_rank_lanes_are_contiguous_blocks():
    assert [list(rank_lanes(8, 4, r)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_layouts_that_cannot_work_are_refused():
    with pytest.raises(DataError, match="cannot fill 16 lanes"):
        PlanSpec(SIZES, 16, 16, 0).check()
    with pytest.raises(DataError, match="fewer samples than one global batch"):
        PlanSpec((3, 3), 2, 16, 0).check()
    with pytest.raises(DataError, match="3 workers cannot share 4 lanes"):
        SPEC.check(world_size=3)
    with pytest.raises(DataError, match="shard list is empty"):
        PlanSpec((), 1, 1, 0).check()


def test_seeking_is_a_search_that_agrees_with_walking_and_refuses_the_unreachable(shards_dir, capsys):
    """locate() equals walking the epochs one by one; a step no run reaches is one line at once, not a hang."""
    import time

    from dist_train.cli import main
    from dist_train.data.plan import MAX_EPOCHS

    spec = PlanSpec(SIZES, 4, 8, 5, 1)

    def walked(position):
        epoch = 0
        while position >= epoch_length(spec, epoch):
            position -= epoch_length(spec, epoch)
            epoch += 1
        return epoch, position

    for position in (*range(0, 400, 7), 5_000, 12_345, 4_001):  # out of order: the cache extends and searches
        assert locate(spec, position) == walked(position)
        epoch = locate(spec, position)[0]
        assert epoch_start(spec, epoch) <= position < epoch_start(spec, epoch + 1)
    from dist_train.data.plan import reach_check

    with pytest.raises(DataError, match=f"beyond {MAX_EPOCHS:,} epochs"):
        reach_check(spec, 10**14)
    assert locate(spec, 1000 * epoch_start(spec, 1))[0] >= 900, "training itself has no epoch limit"
    t = time.time()
    for args in (["--from-step", "100000000000000"], ["--epoch", "10000000000"]):
        assert main(["data", "plan", str(shards_dir), "--global-batch", "4", "--world-size", "2", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "no run gets there" in err, err
    assert time.time() - t < 30
    for args, word in ((["--from-step", "-1"], "--from-step"), (["--steps", "0"], "--steps"),
                       (["--epoch", "-2"], "--epoch"), (["--window-shards", "0"], "--window-shards")):
        assert main(["data", "plan", str(shards_dir), "--global-batch", "4", "--world-size", "2", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and word in err, err
