"""The sample plan: which samples each rank trains on at each step. Pure functions only.

Design (after mosaicml-streaming's canonical nodes): the training shards of an epoch are
permuted by (seed, epoch) and dealt round-robin to a fixed number of *lanes*. Global step s
takes the next `global_batch / lanes` samples of every lane, lanes in order. A rank owns a
contiguous block of `lanes / world_size` lanes, so each shard is read by exactly one rank, and
the global sequence of samples does not depend on the worker count — a run can resume on any
worker count that divides the lane count. Every rank does the same number of steps by
construction: an epoch lasts as long as its shortest lane allows (the tail of longer lanes,
at most about one shard, is skipped that epoch and shuffled back in the next).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from dist_train.data.manifest import DataError


@dataclass(frozen=True)
class LaneSpan:
    """A contiguous run of samples of one lane: shard list, start shard and offset, count."""

    shards: tuple[int, ...]  # shard indices of this lane, in read order
    start_shard: int  # position in `shards` of the first sample
    offset: int  # sample index inside that shard
    count: int  # samples to read


def lanes_for_epoch(shard_sizes: tuple[int, ...], lanes: int, seed: int, epoch: int) -> list[tuple[int, ...]]:
    """Shard indices dealt to each lane for this epoch (shard order permuted by seed and epoch)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shard_sizes))
    return [tuple(int(i) for i in order[lane::lanes]) for lane in range(lanes)]


@lru_cache(maxsize=64)
def steps_in_epoch(shard_sizes: tuple[int, ...], lanes: int, global_batch: int, seed: int, epoch: int) -> int:
    """Optimizer steps epoch `epoch` provides: limited by its shortest lane."""
    per_lane = global_batch // lanes
    shortest = min(sum(shard_sizes[i] for i in lane) for lane in lanes_for_epoch(shard_sizes, lanes, seed, epoch))
    return shortest // per_lane


def locate(step: int, shard_sizes: tuple[int, ...], lanes: int, global_batch: int, seed: int) -> tuple[int, int]:
    """Map a global step (0-based) to (epoch, step within that epoch)."""
    if lanes > len(shard_sizes):
        raise DataError(f"{len(shard_sizes)} training shards cannot fill {lanes} lanes: rebuild with "
                        f"more, smaller shards (--samples-per-shard) or lower pretrain.data.lanes")
    epoch = 0
    while True:
        n = steps_in_epoch(shard_sizes, lanes, global_batch, seed, epoch)
        if n == 0:
            raise DataError(f"an epoch of {sum(shard_sizes)} samples in {lanes} lanes gives no step of "
                            f"global batch {global_batch}: add data or lower the global batch")
        if step < n:
            return epoch, step
        step -= n
        epoch += 1


def lane_spans(step: int, num_steps: int, shard_sizes: tuple[int, ...], lanes: int, global_batch: int,
               seed: int, lane_ids: range) -> tuple[int, list[LaneSpan]]:
    """Where each of `lane_ids` starts at `step`, for up to `num_steps` steps within one epoch.

    Returns (steps covered, spans). The span count is shortened to the end of the epoch; the
    caller continues with the next epoch. O(shards per lane): no sample is read to find it.
    """
    epoch, in_epoch = locate(step, shard_sizes, lanes, global_batch, seed)
    covered = min(num_steps, steps_in_epoch(shard_sizes, lanes, global_batch, seed, epoch) - in_epoch)
    per_lane = global_batch // lanes
    assignment = lanes_for_epoch(shard_sizes, lanes, seed, epoch)
    spans = []
    for lane in lane_ids:
        shards = assignment[lane]
        ends = np.cumsum([shard_sizes[i] for i in shards]).tolist()
        first = in_epoch * per_lane
        j = bisect.bisect_right(ends, first)
        offset = first - (ends[j - 1] if j else 0)
        spans.append(LaneSpan(shards, j, offset, covered * per_lane))
    return covered, spans


def rank_lanes(lanes: int, world_size: int, rank: int) -> range:
    """The contiguous block of lanes a rank reads."""
    per_rank = lanes // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


def rank_step_samples(step: int, shard_sizes: tuple[int, ...], lanes: int, global_batch: int, seed: int,
                      world_size: int, rank: int) -> list[tuple[int, int]]:
    """The (shard index, sample index) pairs rank `rank` trains on at `step`, in order.

    This is the reference the streaming loader must reproduce; it is also what
    `dist-train data plan` prints.
    """
    _, spans = lane_spans(step, 1, shard_sizes, lanes, global_batch, seed, rank_lanes(lanes, world_size, rank))
    return [s for span in spans for s in iter_span(span, shard_sizes)]


def iter_span(span: LaneSpan, shard_sizes: tuple[int, ...]):
    """The (shard, sample) pairs of a span, crossing shard boundaries within the lane."""
    j, offset, left = span.start_shard, span.offset, span.count
    while left > 0:
        shard = span.shards[j]
        take = min(left, shard_sizes[shard] - offset)
        for k in range(offset, offset + take):
            yield shard, k
        left -= take
        j, offset = j + 1, 0
