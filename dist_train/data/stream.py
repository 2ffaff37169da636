"""The WebDataset pipeline that delivers exactly what data/plan.py says, step by step.

A rank reads only the windows of its own lanes. Each window (a few whole shards) is read
sequentially as a tar stream, checked (member names and sizes, shape, dtype), reordered by
the plan's permutation and cut to the positions the plan uses. Windows are the unit of work
for DataLoader workers (worker i reads windows i, i+N, ...; the DataLoader returns them in
order), so workers never read a shard twice. Resuming at step k reads at most the one window
the step falls in: the resume state is one integer, the next global step.
"""

from __future__ import annotations

import hashlib
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
from dist_train.data.mixture import Mixture, counts, source_runs
from dist_train.data.plan import PlanSpec, Window, epoch_length, lane_windows, locate, rank_lanes, window_order
from dist_train.data.sources import open_binary


class _HashingReader:
    """A read-only file wrapper that hashes everything read through it."""

    def __init__(self, f) -> None:
        self.f, self.h = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.h.update(data)
        return data

    def finish(self) -> str:
        while self.read(1 << 20):
            pass
        return self.h.hexdigest()


NPY_HEADER_MAX = 1 << 16  # a version-1 .npy header is at most 64 KiB
UNKNOWN_LENGTH_MAX = 1 << 26  # a member's bound when the sequence length is not known (64 MiB)


def load_shard(path: str, *, samples: int, seq_len: int | None,
               sha256: str | None = None) -> tuple[list[np.ndarray | None], list[str]]:
    """Every sample of a tar shard (None where unreadable) and the problems found.

    Streams the tar member by member and decodes npy only, never pickle. Checks member names,
    shapes and dtypes, the sample count, and (when given) the sha256 of the whole file, which is
    hashed while it streams, so verification costs no extra read. Memory stays bounded whatever
    the file declares: reading stops, before the member is read, at a member larger than a sample of
    `seq_len` int64 tokens can be, and after `samples` + 64 members.
    """
    import tarfile

    rows: list[np.ndarray | None] = [None] * samples
    problems: list[str] = []
    name = path.rsplit("/", 1)[-1]
    limit = NPY_HEADER_MAX + 8 * seq_len if seq_len is not None else UNKNOWN_LENGTH_MAX
    try:
        with open_binary(path) as raw:
            f = _HashingReader(raw)
            with tarfile.open(fileobj=f, mode="r|*") as tar:  # a stream: members are read in order, once
                for n, member in enumerate(tar):
                    if n >= samples + 64:
                        problems.append(f"{name}: more than {n} members for {samples} samples")
                        break
                    if member.size > limit:  # checked before reading: a header can claim any size
                        problems.append(f"{name}: member {member.name} declares {member.size} bytes, more than "
                                        f"a sample can take ({limit}); the rest of the shard is not read")
                        break  # even skipping the claimed bytes would take as long as the claim is large
                    problem = _load_member(tar, member, rows, seq_len)
                    if problem:
                        problems.append(f"{name}: {problem}")
                    tar.members = []  # a stream's member list would grow with the file
            digest = f.finish()
    except Exception as e:  # truncated or garbled tar: keep what was read before the damage
        reason = str(e.args[0]).splitlines()[0][:80] if e.args else ""
        problems.append(f"{name}: unreadable after {sum(r is not None for r in rows)} samples "
                        f"({e.__class__.__name__}{': ' + reason if reason else ''})")
        digest = None
    missing = sum(r is None for r in rows)
    if missing and not problems:
        problems.append(f"{name}: {missing} of {samples} samples missing (truncated?)")
    if digest is not None and sha256 is not None and digest != sha256:
        # Policy `error` stops here; `skip` keeps the samples that still decode to the right
        # shape (a truncated copy keeps its intact prefix) and replaces only the rest.
        problems.append(f"{name}: sha256 {digest[:12]}… does not match the manifest's {sha256[:12]}…")
    return rows, problems


def _load_member(tar, member, rows: list[np.ndarray | None], seq_len: int | None) -> str | None:
    """Decode one tar member into `rows` at its index; the problem with it, or None."""
    key, _, suffix = member.name.partition(".")
    index = int(key) if key.isdigit() else -1
    if not member.isreg() or suffix != TOKENS_KEY or not 0 <= index < len(rows):
        return f"unexpected member {member.name!r}"
    try:
        arr = np.lib.format.read_array(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)
    except (ValueError, OSError) as e:
        return f"member {key}.{TOKENS_KEY} does not decode ({e.__class__.__name__})"
    if arr.ndim != 1 or arr.dtype.kind not in "iu" or (seq_len is not None and arr.shape[0] != seq_len):
        return f"member {key} holds {arr.dtype}{list(arr.shape)}, not {seq_len} integer tokens"
    rows[index] = arr
    return None


def read_shard(path: str, *, samples: int, seq_len: int | None = None, sha256: str | None = None) -> list[np.ndarray]:
    """All samples of a shard, or DataError naming the shard, the member and the fix."""
    rows, problems = load_shard(path, samples=samples, seq_len=seq_len, sha256=sha256)
    if problems:
        raise DataError(f"bad shard {path}: {problems[0]}: rebuild it with `dist-train data build`, or set "
                        "pretrain.data.on_bad_sample=skip")
    return rows


def read_window(man: Manifest, spec: PlanSpec, window: Window, first: int, last: int, *,
                on_bad: str = "error", verify: bool = True) -> tuple[np.ndarray, list[tuple[int, int]], int]:
    """Samples at lane positions [first, last) of a window, in plan order, as a (n, T) array, with
    their (shard, sample) ids and the number of bad samples replaced.

    Policy `skip` replaces an unreadable sample by a readable one of the same window (chosen
    deterministically), so the step keeps its size on every rank; `error` raises DataError.
    """
    rows: list[np.ndarray | None] = []
    for shard in window.shards:
        info = man.train[shard]
        got, problems = load_shard(man.path(info), samples=info.samples, seq_len=man.seq_len,
                                   sha256=info.sha256 if verify else None)
        if problems and on_bad == "error":
            raise DataError(f"bad shard {man.path(info)}: {problems[0]}: rebuild it, or set "
                            "pretrain.data.on_bad_sample=skip")
        for problem in problems:
            print(f"[data] {problem}; replacing its bad samples (on_bad_sample=skip)", flush=True)
        rows += got
    physical = [(shard, k) for shard in window.shards for k in range(spec.sizes[shard])]
    good = [i for i, r in enumerate(rows) if r is not None]
    if not good:
        raise DataError(f"every sample of shards {[man.train[s].file for s in window.shards]} is unreadable: "
                        "rebuild them")
    order = window_order(spec, window)[first - window.start:last - window.start]
    chosen = [i if rows[i] is not None else good[i % len(good)] for i in order]
    replaced = sum(rows[i] is None for i in order)
    return np.stack([rows[i] for i in chosen]), [physical[i] for i in chosen], replaced  # (n, T)


@dataclass(frozen=True)
class Block:
    """A run of consecutive lane positions of one lane, ready to batch."""

    lane: int
    start: int  # lane position (from the start of training) of rows[0]
    rows: np.ndarray  # (n, T)
    ids: list[tuple[int, int]]  # (shard, sample) of each row
    replaced: int = 0  # bad samples replaced in this block (policy skip)


class RankWindows(torch.utils.data.IterableDataset):
    """The windows one rank reads from `start_position` on, in plan order, as Blocks.

    Windows are enumerated (window by window, lanes interleaved) and dealt round-robin to the
    DataLoader's workers; with the DataLoader's in-order delivery the result is the same
    sequence for any number of workers.
    """

    def __init__(self, man: Manifest, spec: PlanSpec, lanes: range, start_position: int, on_bad: str = "error",
                 verify: bool = True) -> None:
        self.man, self.spec, self.lanes, self.start_position = man, spec, lanes, start_position
        self.on_bad, self.verify = on_bad, verify

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
                yield Block(w.lane, absolute, *read_window(self.man, self.spec, w, first, last, on_bad=self.on_bad,
                                                           verify=self.verify))


def _identity(block: Block) -> Block:
    return block


def pretrain_batches(mans: list[Manifest], mix: Mixture, *, world_size: int, rank: int, start_step: int,
                     loader_workers: int = 0, on_bad: str = "error",
                     verify: bool = True) -> Iterator[tuple[np.ndarray, list[tuple[int, int, int]], int]]:
    """Yield, for each step from `start_step` on, this rank's samples as one (B_rank, T) array,
    their (source, shard, sample) ids in the order of data/mixture.py's rank_step_ids, and the
    number of bad samples replaced in them. `mans[i]` is the manifest of mix.sources[i]."""
    lanes = rank_lanes(mix.lanes, world_size, rank)
    first = start_step * mix.per_lane
    blocks: list[Iterator[Block]] = []
    for man, spec, start in zip(mans, mix.sources, counts(mix.weights, first), strict=True):
        dataset = RankWindows(man, spec, lanes, start, on_bad, verify)
        blocks.append(iter(torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=loader_workers, prefetch_factor=2, collate_fn=_identity,
            multiprocessing_context="spawn", persistent_workers=False)) if loader_workers > 0 else iter(dataset))
    pending: dict[tuple[int, int], deque[tuple[np.ndarray, tuple[int, int]]]] = {
        (src, lane): deque() for src in range(len(mans)) for lane in lanes}
    step = start_step
    while True:
        rows, ids, replaced = [], [], 0
        picks = [src for src, _ in source_runs(mix, step * mix.per_lane, mix.per_lane)]
        for lane in lanes:
            for src in picks:
                while not pending[src, lane]:  # windows arrive lane by lane: buffer the others
                    block = next(blocks[src])
                    pending[src, block.lane].extend(zip(block.rows, block.ids, strict=True))
                    replaced += block.replaced
                row, (shard, k) = pending[src, lane].popleft()
                rows.append(row)
                ids.append((src, shard, k))
        yield np.stack(rows), ids, replaced  # (B_rank, T)
        step += 1


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
