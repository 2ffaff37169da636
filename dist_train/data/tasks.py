"""The pure per-step sample plan of fine-tuning (records are read by dist_train/tasks/records.py).

The global batches of an epoch are a function of (seed, epoch, n, and the examples' token lengths)
only, so the plan is the same on any worker count and a resumed run continues it exactly. With
lengths (length grouping, the default), the epoch's shuffled examples are sorted by length within
windows of up to 50 global batches, cut into global batches, and those batches shuffled again
(the batch holding the longest example first, so a run that cannot fit it fails at step 1):
examples of similar length share a micro batch and padding nearly vanishes, while every batch
still draws from a random part of the data. A rank's micro batches are consecutive runs of the
length-sorted global batch, dealt round-robin over ranks, so every rank gets a similar amount
of work. Without lengths, step s takes the next global_batch examples of the shuffled order,
split evenly over ranks. Evaluation shards are padded to equal length per rank (padding has
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


GROUP_WINDOW = 50  # global batches sorted together by length: the wider, the less padding and the less random


def epoch_batches(epoch: int, n: int, global_batch: int, seed: int, lengths: list[int] | None = None
                  ) -> list[np.ndarray]:
    """The example indices of each global batch of `epoch` (0-based). Pure; the remainder of the
    epoch's order (fewer than one global batch) is not trained on, as without grouping."""
    spe = steps_per_epoch(n, global_batch)
    order = np.random.default_rng([seed, epoch, 1]).permutation(n)[:spe * global_batch]
    if lengths is None:
        return [order[i * global_batch:(i + 1) * global_batch] for i in range(spe)]
    size = np.asarray(lengths)
    window = global_batch * max(1, min(GROUP_WINDOW, spe // 4))
    grouped = np.concatenate([part[np.argsort(-size[part], kind="stable")]
                              for part in np.split(order, range(window, len(order), window))])
    batches = [grouped[i * global_batch:(i + 1) * global_batch] for i in range(spe)]
    shuffled = [batches[i] for i in np.random.default_rng([seed, epoch, 2]).permutation(spe)]
    first = max(range(spe), key=lambda i: (int(size[shuffled[i]].max()), -i))
    return [shuffled[first], *shuffled[:first], *shuffled[first + 1:]]


def rank_micro_batches(batch: np.ndarray, micro_batch: int, world_size: int, rank: int,
                       lengths: list[int] | None = None) -> list[list[int]]:
    """This rank's micro batches of one global batch. With lengths, the batch is sorted by length
    (longest first) and its consecutive runs of `micro_batch` examples are dealt round-robin over the
    ranks; without, the rank takes its contiguous share, cut into micro batches."""
    if lengths is None:
        per_rank = len(batch) // world_size
        own = [int(i) for i in batch[rank * per_rank:(rank + 1) * per_rank]]
        return [own[j:j + micro_batch] for j in range(0, len(own), micro_batch)]
    size = np.asarray(lengths)
    ordered = [int(i) for i in batch[np.argsort(-size[batch], kind="stable")]]
    runs = [ordered[j:j + micro_batch] for j in range(0, len(ordered), micro_batch)]
    return runs[rank::world_size]


def eval_shard(n: int, world_size: int, rank: int) -> list[tuple[int, float]]:
    """(index, weight) pairs of a rank's evaluation share; equal length on every rank."""
    per_rank = -(-n // world_size)
    own = list(range(rank, n, world_size))
    return [(i, 1.0) for i in own] + [(0, 0.0)] * (per_rank - len(own))
