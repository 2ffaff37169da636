"""The ledger proves exactly-once training across restarts and worker-count changes."""

from pathlib import Path

from dist_train.data.ledger import Ledger, compress, expand, verify
from dist_train.data.mixture import Mixture
from dist_train.data.plan import PlanSpec, epoch_length, rank_step_samples

SIZES = (40, 40, 40, 40, 40, 40, 40, 17)
SPEC = PlanSpec(SIZES, lanes=4, global_batch=8, seed=2, window_shards=2)
FILES = [f"shard-{i:06d}.tar" for i in range(len(SIZES))]


def test_compress_round_trip():
    ids = [("a", 3), ("a", 4), ("a", 5), ("b", 0), ("a", 6)]
    assert compress(ids) == [["a", 3, 3], ["b", 0, 1], ["a", 6, 1]]
    assert expand(compress(ids)) == ids


def record(ckpt: Path, world: int, steps: range, attempt: float, mutate=None):
    for rank in range(world):
        led = Ledger(rank, world, attempt)
        for step in steps:
            ids = [(FILES[s], k) for s, k in rank_step_samples(SPEC, step, world, rank)]
            led.record(step, mutate(step, rank, ids) if mutate else ids)
        led.flush(ckpt)


def test_resizes_and_restarts_verify_clean(tmp_path):
    stage = tmp_path / "pretrain"
    per_epoch = epoch_length(SPEC, 0) * 4 // 8
    # 2 workers, then 1 (with a re-run of steps 10-11 after resuming from an older commit), then 4
    record(stage / "checkpoints" / "step_00000012", 2, range(0, 12), attempt=1.0)
    record(stage / "checkpoints" / "step_00000030", 1, range(10, 30), attempt=2.0)
    record(stage / "checkpoints" / "step_00000070", 4, range(30, per_epoch + 5), attempt=3.0)
    v = verify(stage, Mixture.of(SPEC), [FILES])
    assert v.ok, v
    assert v.steps == per_epoch + 5 and v.world_sizes == [1, 2, 4] and v.complete_epochs == 1
    assert v.duplicated == v.missing == v.off_plan_steps == 0 and v.rerun_steps == 2


def test_duplicates_missing_and_off_plan_are_caught(tmp_path):
    stage = tmp_path / "pretrain"

    def repeat_first(step, rank, ids):  # step 3 rank 1 trains on step 2's samples
        return [(FILES[s], k) for s, k in rank_step_samples(SPEC, 2, 2, rank)] if (step, rank) == (3, 1) else ids

    per_epoch = -(-epoch_length(SPEC, 0) // SPEC.per_lane)  # steps until epoch 0 is complete
    record(stage / "checkpoints" / "step_1", 2, range(per_epoch), attempt=1.0, mutate=repeat_first)
    v = verify(stage, Mixture.of(SPEC), [FILES])
    assert not v.ok and v.off_plan_steps == 1 and v.duplicated == 4 and v.missing == 4
    gap = tmp_path / "gap"
    record(gap / "checkpoints" / "step_a", 2, range(0, 5), attempt=1.0)
    record(gap / "checkpoints" / "step_b", 2, range(6, 9), attempt=1.0)
    v = verify(gap, Mixture.of(SPEC), [FILES])
    assert not v.ok and "step 5 has no record" in v.problems
