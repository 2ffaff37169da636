"""Mixtures: exact shares, O(1) positions, worker-count independence, and a loader that follows them."""

from collections import Counter
from fractions import Fraction
from itertools import islice

import numpy as np
import pytest

from dist_train.data.ledger import Ledger, verify
from dist_train.data.manifest import DataError, read_manifest
from dist_train.data.mixture import Mixture, counts, label, rank_step_ids, shard_name, source_runs
from dist_train.data.plan import PlanSpec
from dist_train.data.stream import pretrain_batches, read_shard

MAIN = PlanSpec((40,) * 7 + (17,), lanes=4, global_batch=16, seed=0)
REPLAY = PlanSpec((25,) * 6, lanes=4, global_batch=16, seed=1)


@pytest.mark.parametrize("weights", [(0.9,), (0.25, 0.1), (0.5,), (0.001,)])
def test_counts_are_exact_shares(weights):
    w = Mixture.weighted((MAIN,) * (len(weights) + 1), weights).weights
    assert sum(w) == 1
    for p in (0, 1, 7, 100, 12345):
        c = counts(w, p)
        assert sum(c) == p
        assert all(abs(ci - wi * p) <= len(w) for ci, wi in zip(c, w, strict=True))
    for p in range(200):  # monotone: each position goes to exactly one source
        step = [b - a for a, b in zip(counts(w, p), counts(w, p + 1), strict=True)]
        assert sorted(step) == [0] * (len(w) - 1) + [1]


def test_mixture_weights_hold_in_the_plan():
    mix = Mixture.weighted((MAIN, REPLAY), (0.1,))
    ids = [i for step in range(50) for i in rank_step_ids(mix, step, 2, 0) + rank_step_ids(mix, step, 2, 1)]
    share = Counter(src for src, _, _ in ids)[1] / len(ids)
    assert share == pytest.approx(0.1, abs=0.01)
    assert counts(mix.weights, 10**9)[1] == 10**8  # O(1) at any position, exact


def test_mixture_plan_is_world_size_independent_and_exactly_once():
    mix = Mixture.weighted((MAIN, REPLAY), (0.3,))
    for step in (0, 3, 40):
        one = rank_step_ids(mix, step, 1, 0)
        assert one == [i for r in range(2) for i in rank_step_ids(mix, step, 2, r)]
        assert one == [i for r in range(4) for i in rank_step_ids(mix, step, 4, r)]
    seen = Counter(i for step in range(12) for i in rank_step_ids(mix, step, 1, 0) if i[0] == 0)  # < 1 epoch
    assert max(seen.values()) == 1


def test_loader_follows_a_two_corpus_mixture(shards_dir, tmp_path):
    man = read_manifest(shards_dir)
    sub = read_manifest(f"{shards_dir}/shard-{{000000..000002}}.tar")  # a second corpus: 3 of the shards
    specs = (PlanSpec(tuple(s.samples for s in man.train), 2, 8, 0), PlanSpec(tuple(s.samples for s in sub.train),
                                                                               2, 8, 1))
    mix = Mixture.weighted(specs, (0.25,))
    tables = [{(i, k): a for i, s in enumerate(m.train) for k, a in enumerate(read_shard(m.path(s), samples=s.samples))}
              for m in (man, sub)]
    files = [[s.file for s in m.train] for m in (man, sub)]
    for rank in range(2):
        got = list(islice(pretrain_batches([man, sub], mix, world_size=2, rank=rank, start_step=5), 40))
        ledger = Ledger(rank, 2, attempt=1.0)
        for step, (rows, ids, _) in enumerate(got, start=5):
            assert ids == rank_step_ids(mix, step, 2, rank)
            np.testing.assert_array_equal(rows, np.stack([tables[src][s, k] for src, s, k in ids]))
            ledger.record(step, [(shard_name(files, src, s), k) for src, s, k in ids])
        ledger.flush(tmp_path / "pretrain" / "checkpoints" / "step_x")
    assert label(files, 1, 0, 3) == "mix1/shard-000000.tar:3"
    # the ledger from step 5 on: steps 0-4 are missing, which verify must say
    v = verify(tmp_path / "pretrain", mix, files)
    assert not v.ok and "step 0 has no record" in v.problems and v.off_plan_steps == 0


def test_weights_must_leave_room_for_the_main_corpus():
    with pytest.raises(DataError, match="must leave a share"):
        Mixture.weighted((MAIN, REPLAY), (1.0,)).check()
    assert Mixture.weighted((MAIN, REPLAY), (0.5,)).weights == (Fraction(1, 2), Fraction(1, 2))
    assert [s for s, _ in source_runs(Mixture.weighted((MAIN, REPLAY), (0.5,)), 0, 4)] == [1, 0, 1, 0]
