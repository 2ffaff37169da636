"""The WebDataset pipeline that delivers exactly what data/plan.py says, step by step.

A rank reads only the windows of its own lanes. Each window (a few whole shards) is read
sequentially through webdataset's tar iterator, checked (member keys, shape, dtype), reordered by
the plan's permutation and cut to the positions the plan uses. Windows are the unit of work
for DataLoader workers (worker i reads windows i, i+N, ...; the DataLoader returns them in
order), so workers never read a shard twice. Resuming at step k reads at most the one window
the step falls in: the resume state is one integer, the next global step.
"""

from __future__ import annotations

import io
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from dist_train.data.manifest import TOKENS_KEY, DataError, Manifest
from dist_train.data.plan import PlanSpec, Window, epoch_length, lane_windows, locate, rank_lanes, window_order


def read_shard(path: str, skip: int = 0, *, seq_len: int | None = None) -> Iterator[np.ndarray]:
    """Token arrays of one tar shard in order, from sample `skip` on. Decodes npy only, never pickle."""
    import fsspec
    import webdataset as wds

    with fsspec.open(path, "rb") as f:
        files = wds.tariterators.tar_file_expander([{"url": path, "stream": f}], eof_value=None)
        samples = wds.tariterators.group_by_keys(files)
        for index, sample in enumerate(samples):
            if index < skip:
                continue
            raw = sample.get(TOKENS_KEY)
            if raw is None or sample["__key__"] != f"{index:07d}":
                raise DataError(f"shard {path} is damaged at member {sample.get('__key__')!r} (expected sample "
                                f"{index:07d}.{TOKENS_KEY}): rebuild it with `dist-train data build`")
            arr = np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
            if arr.ndim != 1 or arr.dtype.kind not in "iu" or (seq_len is not None and arr.shape[0] != seq_len):
                raise DataError(f"shard {path} member {index:07d} holds {arr.dtype}{list(arr.shape)}, not "
                                f"{seq_len} integer tokens: rebuild the shards")
            yield arr


def read_window(man: Manifest, spec: PlanSpec, window: Window, first: int,
                last: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Samples at lane positions [first, last) of a window, in plan order, as a (n, T) array,
    with their (shard, sample) ids."""
    rows = [arr for shard in window.shards for arr in read_shard(man.path(man.train[shard]), seq_len=man.seq_len)]
    if len(rows) != window.size:
        raise DataError(f"window of shards {[man.train[s].file for s in window.shards]} holds {len(rows)} samples, "
                        f"the manifest says {window.size}: rebuild the shards")
    physical = [(shard, k) for shard in window.shards for k in range(spec.sizes[shard])]
    order = window_order(spec, window)[first - window.start:last - window.start]
    return np.stack([rows[i] for i in order]), [physical[i] for i in order]  # (n, T), n ids


@dataclass(frozen=True)
class Block:
    """A run of consecutive lane positions of one lane, ready to batch."""

    lane: int
    start: int  # lane position (from the start of training) of rows[0]
    rows: np.ndarray  # (n, T)
    ids: list[tuple[int, int]]  # (shard, sample) of each row


class RankWindows(torch.utils.data.IterableDataset):
    """The windows one rank reads from `start_position` on, in plan order, as Blocks.

    Windows are enumerated (window by window, lanes interleaved) and dealt round-robin to the
    DataLoader's workers; with the DataLoader's in-order delivery the result is the same
    sequence for any number of workers.
    """

    def __init__(self, man: Manifest, spec: PlanSpec, lanes: range, start_position: int) -> None:
        self.man, self.spec, self.lanes, self.start_position = man, spec, lanes, start_position

    def work(self) -> Iterator[tuple[Window, int, int, int]]:
        """(window, first, last, absolute start) for every window this rank reads, forever."""
        epoch, pos = locate(self.spec, self.start_position)
        base = self.start_position - pos  # lane position where `epoch` began
        while True:
            length = epoch_length(self.spec, epoch)
            # Per lane, the windows from the one holding `pos` up to the epoch's used length;
            # lanes are interleaved window by window so that they fill at the same pace.
            todo = []
            for lane in self.lanes:
                windows = lane_windows(self.spec, epoch, lane)
                todo.append([w for w in windows if w.start < length and w.start + w.size > pos])
            for round_ in range(max(len(t) for t in todo)):
                for windows in todo:
                    if round_ < len(windows):
                        w = windows[round_]
                        first, last = max(w.start, pos), min(w.start + w.size, length)
                        yield w, first, last, base + first
            base += length
            epoch, pos = epoch + 1, 0

    def __iter__(self) -> Iterator[Block]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for i, (w, first, last, absolute) in enumerate(self.work()):
            if i % workers == worker:
                yield Block(w.lane, absolute, *read_window(self.man, self.spec, w, first, last))


def _identity(block: Block) -> Block:
    return block


def pretrain_batches(man: Manifest, spec: PlanSpec, *, world_size: int, rank: int, start_step: int,
                     loader_workers: int = 0) -> Iterator[tuple[np.ndarray, list[tuple[int, int]]]]:
    """Yield, for each step from `start_step` on, this rank's samples as one (B_rank, T) array
    and their (shard, sample) ids, in the order of data/plan.py's rank_step_samples."""
    lanes = rank_lanes(spec.lanes, world_size, rank)
    dataset = RankWindows(man, spec, lanes, start_step * spec.per_lane)
    if loader_workers > 0:
        blocks: Iterator[Block] = iter(torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=loader_workers, prefetch_factor=2,
            collate_fn=_identity, multiprocessing_context="spawn", persistent_workers=False))
    else:
        blocks = iter(dataset)
    pending: dict[int, deque[Block]] = {lane: deque() for lane in lanes}
    have = dict.fromkeys(lanes, 0)
    while True:
        while any(have[lane] < spec.per_lane for lane in lanes):
            block = next(blocks)
            pending[block.lane].append(block)
            have[block.lane] += len(block.ids)
        rows, ids = [], []
        for lane in lanes:
            need = spec.per_lane
            while need:
                head = pending[lane][0]
                take = min(need, len(head.ids))
                rows.append(head.rows[:take])
                ids += head.ids[:take]
                if take == len(head.ids):
                    pending[lane].popleft()
                else:
                    pending[lane][0] = Block(lane, head.start + take, head.rows[take:], head.ids[take:])
                need -= take
            have[lane] -= spec.per_lane
        yield np.concatenate(rows), ids  # (B_rank, T)


def validation_batches(man: Manifest, *, micro_batch: int, world_size: int, rank: int,
                       max_batches: int) -> Iterator[np.ndarray]:
    """This rank's share of the held-out samples (every world_size-th), as (micro, T) arrays.

    Every rank yields the same number of batches, so evaluation collectives never hang.
    """
    total = sum(s.samples for s in man.validation)
    batches = total // world_size // micro_batch
    if max_batches:
        batches = min(batches, max_batches)
    wanted = batches * micro_batch
    rows: list[np.ndarray] = []
    index = taken = 0
    for shard in man.validation:
        for arr in read_shard(man.path(shard), seq_len=man.seq_len):
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
        t0 = time.perf_counter()
        item = self.q.get()
        self.wait_s += time.perf_counter() - t0
        if item is self._END:
            if self.error is not None:
                raise self.error
            raise StopIteration
        return item
