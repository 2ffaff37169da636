"""The pure per-step sample plan of fine-tuning (records are read by dist_train/tasks/records.py).

The order of training examples in an epoch is a function of (seed, epoch, n) only; step s of
the run takes the next global_batch examples, split evenly over ranks, so the plan is the
same on any worker count. Evaluation shards are padded to equal length per rank (padding has
weight 0) so that every rank runs the same number of forward passes.
"""

from __future__ import annotations

import numpy as np

from dist_train.data.manifest import DataError


def steps_per_epoch(n: int, global_batch: int) -> int:
    if n < global_batch:
        raise DataError(f"{n} training examples are fewer than one global batch of {global_batch}: "
                        "lower finetune.train.global_batch_size or add data")
    return n // global_batch


def step_indices(step: int, n: int, global_batch: int, seed: int, world_size: int, rank: int) -> list[int]:
    """Example indices rank `rank` trains on at global step `step` (0-based). Pure."""
    spe = steps_per_epoch(n, global_batch)
    epoch, in_epoch = divmod(step, spe)
    order = np.random.default_rng([seed, epoch, 1]).permutation(n)
    batch = order[in_epoch * global_batch:(in_epoch + 1) * global_batch]
    per_rank = global_batch // world_size
    return [int(i) for i in batch[rank * per_rank:(rank + 1) * per_rank]]


def eval_shard(n: int, world_size: int, rank: int) -> list[tuple[int, float]]:
    """(index, weight) pairs of a rank's evaluation share; equal length on every rank."""
    per_rank = -(-n // world_size)
    own = list(range(rank, n, world_size))
    return [(i, 1.0) for i in own] + [(0, 0.0)] * (per_rank - len(own))
