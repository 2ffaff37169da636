"""The WebDataset pipeline that delivers exactly what data/plan.py says, step by step.

Each rank opens only the shards of its own lanes, starting at the planned shard and offset:
resuming at step k costs reading at most the skipped part of one shard per lane, never the
samples of earlier steps. Its resume state is one integer: the next global step.
"""

from __future__ import annotations

import io
import queue
import threading
from collections.abc import Iterator
from itertools import islice

import numpy as np

from dist_train.data.manifest import TOKENS_KEY, DataError, Manifest
from dist_train.data.plan import LaneSpan, lane_spans, rank_lanes


def read_shard(path: str, skip: int = 0) -> Iterator[np.ndarray]:
    """Token arrays of one tar shard in order, from sample `skip` on (no pickle is ever loaded)."""
    import webdataset as wds

    pipeline = wds.DataPipeline(wds.SimpleShardList([path]), wds.tarfile_to_samples())
    for index, sample in enumerate(islice(pipeline, skip, None), start=skip):
        raw = sample.get(TOKENS_KEY)
        if raw is None or sample["__key__"] != f"{index:07d}":
            raise DataError(f"shard {path} is damaged at sample {index} (key {sample.get('__key__')!r}): "
                            "rebuild it with `dist-train data build`")
        yield np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)


def _lane_samples(man: Manifest, span: LaneSpan) -> Iterator[np.ndarray]:
    left, offset = span.count, span.offset
    for shard in span.shards[span.start_shard:]:
        if left <= 0:
            return
        for arr in read_shard(man.path(man.train[shard]), offset):
            yield arr
            left -= 1
            if left == 0:
                return
        offset = 0
    if left > 0:
        raise DataError(f"lane ran out of samples {left} early: {man.root}/manifest.json does not match "
                        "its shards; rebuild them")


def pretrain_batches(man: Manifest, *, lanes: int, global_batch: int, seed: int, world_size: int, rank: int,
                     start_step: int) -> Iterator[np.ndarray]:
    """Yield, for each step from `start_step` on, this rank's samples as one (B_rank, T) array."""
    sizes = tuple(s.samples for s in man.train)
    per_lane = global_batch // lanes
    step = start_step
    while True:  # one epoch (or the rest of it) per pass
        covered, spans = lane_spans(step, 1 << 62, sizes, lanes, global_batch, seed,
                                    rank_lanes(lanes, world_size, rank))
        streams = [_lane_samples(man, span) for span in spans]
        for _ in range(covered):
            rows = [arr for stream in streams for arr in islice(stream, per_lane)]
            yield np.stack(rows)  # (B_rank, T)
        step += covered


def validation_batches(man: Manifest, *, micro_batch: int, world_size: int, rank: int,
                       max_batches: int) -> Iterator[np.ndarray]:
    """This rank's share of the held-out samples (every world_size-th), as (micro, T) arrays.

    Every rank yields the same number of batches, so evaluation collectives never hang.
    """
    total = sum(s.samples for s in man.validation)
    per_rank = total // world_size
    batches = per_rank // micro_batch
    if max_batches:
        batches = min(batches, max_batches)
    wanted = batches * micro_batch
    rows: list[np.ndarray] = []
    taken = 0
    index = 0
    for shard in man.validation:
        for arr in read_shard(man.path(shard)):
            if index % world_size == rank and taken < wanted:
                rows.append(arr)
                taken += 1
                if len(rows) == micro_batch:
                    yield np.stack(rows)
                    rows = []
            index += 1
        if taken >= wanted:
            return


class Prefetcher:
    """Runs an iterator in a background thread, `depth` items ahead, and times the waits.

    `wait_s` accumulates the time the consumer spent blocked: the data-wait share of a step.
    """

    _END = object()

    def __init__(self, source: Iterator, depth: int = 2) -> None:
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.wait_s = 0.0
        self.thread = threading.Thread(target=self._run, args=(source,), daemon=True)
        self.thread.start()

    def _run(self, source: Iterator) -> None:
        try:
            for item in source:
                self.q.put(item)
        except BaseException as e:  # surfaced in the consumer, with its own traceback
            self.error = e
        self.q.put(self._END)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self):
        import time

        t0 = time.perf_counter()
        item = self.q.get()
        self.wait_s += time.perf_counter() - t0
        if item is self._END:
            if self.error is not None:
                raise self.error
            raise StopIteration
        return item
