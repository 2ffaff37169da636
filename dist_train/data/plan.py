"""The sample plan: which samples each rank trains on at each step. Pure functions only.

Design (after mosaicml-streaming's canonical nodes). For each epoch the training shards are
permuted by (seed, epoch) and dealt round-robin to a fixed number of *lanes*. A lane is read as
consecutive *windows* of `window_shards` shards; the samples of a window are permuted by
(seed, epoch, lane, window) — the bounded shuffle. Every lane of an epoch is used for the same
number of samples (its shortest lane's length; the longer lanes' tails, under one shard each,
wait for the next epoch's reshuffle), so all lanes cross epochs at the same position.

Global step s takes positions [s·k, (s+1)·k) of every lane, k = global_batch / lanes, lanes in
order. A rank owns a contiguous block of lanes / world_size lanes, so each shard is read by one
rank, and the global sample sequence is the same for any worker count that divides the lanes.
Every rank runs the same number of steps by construction.

Shuffle quality vs memory: a batch draws from `lanes` different windows; a window holds
`window_shards` shards in memory per lane (window_shards × shard bytes per lane being read).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from dist_train.data.manifest import DataError


@dataclass(frozen=True)
class PlanSpec:
    """Everything the plan depends on: a few integers and the shard sizes of the manifest."""

    sizes: tuple[int, ...]  # samples per training shard, manifest order
    lanes: int
    global_batch: int
    seed: int
    window_shards: int = 1

    @property
    def per_lane(self) -> int:
        return self.global_batch // self.lanes

    def check(self, world_size: int | None = None) -> None:
        """Raise DataError for layouts that cannot work, before any cluster resource is spent."""
        if not self.sizes or sum(self.sizes) == 0:
            raise DataError("the shard list is empty: build shards with `dist-train data build`")
        if self.lanes > len(self.sizes):
            raise DataError(f"{len(self.sizes)} training shards cannot fill {self.lanes} lanes: rebuild with more, "
                            "smaller shards (--samples-per-shard) or lower pretrain.data.lanes")
        if self.global_batch % self.lanes:
            raise DataError(f"global batch {self.global_batch} is not divisible by {self.lanes} lanes")
        if world_size is not None and self.lanes % world_size:
            raise DataError(f"{world_size} workers cannot share {self.lanes} lanes evenly: use a worker count "
                            f"that divides {self.lanes}")
        if epoch_length(self, 0) < self.per_lane:
            raise DataError(f"an epoch of {sum(self.sizes)} samples in {self.lanes} lanes holds fewer samples than "
                            f"one global batch of {self.global_batch}: add data or lower the global batch")


@dataclass(frozen=True)
class Window:
    """One window of one lane in one epoch: its shards and where it sits in the lane."""

    epoch: int
    lane: int
    index: int
    shards: tuple[int, ...]
    start: int  # lane position (within the epoch) of its first sample
    size: int  # physical samples in its shards


@lru_cache(maxsize=256)
def epoch_lanes(spec: PlanSpec, epoch: int) -> tuple[tuple[int, ...], ...]:
    """Shard indices dealt to each lane in this epoch (shard order permuted by seed and epoch)."""
    order = np.random.default_rng([spec.seed, epoch]).permutation(len(spec.sizes))
    return tuple(tuple(int(i) for i in order[lane::spec.lanes]) for lane in range(spec.lanes))


@lru_cache(maxsize=256)
def epoch_length(spec: PlanSpec, epoch: int) -> int:
    """Samples every lane contributes in this epoch: its shortest lane's length."""
    return min(sum(spec.sizes[i] for i in lane) for lane in epoch_lanes(spec, epoch))


MAX_EPOCHS = 10_000  # `data plan` refuses a position further out: no run gets there (reach_check)


@lru_cache(maxsize=64)
def _epoch_starts(spec: PlanSpec) -> list[int]:
    """Lane positions where epochs 0, 1, ... begin, extended as far as asked (shared by every lookup)."""
    return [0]


def _starts_through(spec: PlanSpec, position: int | None = None, epoch: int | None = None,
                    limit: int | None = None) -> list[int]:
    starts = _epoch_starts(spec)
    while (position is not None and starts[-1] <= position) or (epoch is not None and len(starts) <= epoch):
        if limit is not None and len(starts) > limit:
            raise DataError(f"that lies beyond {limit:,} epochs of this data ({starts[-1]:,} samples per lane): "
                            "no run gets there; ask for an earlier step")
        starts.append(starts[-1] + epoch_length(spec, len(starts) - 1))
    return starts


def reach_check(spec: PlanSpec, position: int) -> None:
    """DataError when lane `position` lies beyond MAX_EPOCHS epochs (for `data plan`, asked for any step)."""
    _starts_through(spec, position=position, limit=MAX_EPOCHS)


def locate(spec: PlanSpec, position: int) -> tuple[int, int]:
    """Map a lane position counted from the start of training to (epoch, position in epoch): a binary search
    over the epochs' starts, each epoch's length computed once."""
    starts = _starts_through(spec, position=position)
    epoch = bisect.bisect_right(starts, position) - 1
    return epoch, position - starts[epoch]


def epoch_start(spec: PlanSpec, epoch: int) -> int:
    """Lane position (from the start of training) where `epoch` begins."""
    return _starts_through(spec, epoch=epoch)[epoch]


@lru_cache(maxsize=1024)
def lane_windows(spec: PlanSpec, epoch: int, lane: int) -> tuple[Window, ...]:
    shards = epoch_lanes(spec, epoch)[lane]
    m = max(spec.window_shards, 1)
    out, start = [], 0
    for index, first in enumerate(range(0, len(shards), m)):
        group = shards[first:first + m]
        size = sum(spec.sizes[i] for i in group)
        out.append(Window(epoch, lane, index, group, start, size))
        start += size
    return tuple(out)


def window_at(spec: PlanSpec, epoch: int, lane: int, position: int) -> Window:
    windows = lane_windows(spec, epoch, lane)
    return windows[bisect.bisect_right([w.start for w in windows], position) - 1]


def window_order(spec: PlanSpec, window: Window) -> np.ndarray:
    """Physical sample offsets of a window in plan order (the bounded shuffle)."""
    return np.random.default_rng([spec.seed, window.epoch, window.lane, window.index, 7]).permutation(window.size)


@lru_cache(maxsize=256)
def window_samples(spec: PlanSpec, window: Window) -> tuple[tuple[int, int], ...]:
    """(shard, sample) pairs of a window in plan order."""
    physical = [(shard, k) for shard in window.shards for k in range(spec.sizes[shard])]
    return tuple(physical[i] for i in window_order(spec, window))


def lane_samples(spec: PlanSpec, lane: int, position: int, count: int) -> list[tuple[int, int]]:
    """(shard, sample) pairs at lane positions [position, position + count), across epochs."""
    out: list[tuple[int, int]] = []
    while count > 0:
        epoch, pos = locate(spec, position)
        window = window_at(spec, epoch, lane, pos)
        end = min(window.start + window.size, epoch_length(spec, epoch))
        take = min(count, end - pos)
        out += list(window_samples(spec, window)[pos - window.start:pos - window.start + take])
        position += take
        count -= take
    return out


def rank_lanes(lanes: int, world_size: int, rank: int) -> range:
    """The contiguous block of lanes a rank reads."""
    per_rank = lanes // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


def rank_step_samples(spec: PlanSpec, step: int, world_size: int, rank: int) -> list[tuple[int, int]]:
    """The (shard, sample) pairs rank `rank` trains on at global step `step`, in batch order.

    The streaming loader reproduces exactly this; `dist-train data plan` prints it.
    """
    return [s for lane in rank_lanes(spec.lanes, world_size, rank)
            for s in lane_samples(spec, lane, step * spec.per_lane, spec.per_lane)]


def first_step_of_epoch(spec: PlanSpec, epoch: int) -> int:
    """The first global step whose samples belong (at least partly) to `epoch`."""
    return epoch_start(spec, epoch) // spec.per_lane


def step_epoch(spec: PlanSpec, step: int) -> int:
    """The epoch of a step's first sample."""
    return locate(spec, step * spec.per_lane)[0]
