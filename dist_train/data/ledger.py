"""The sample ledger: what each rank actually trained on, and the proof that it matches the plan.

Each rank records, per step, the (shard, sample) ids the loader delivered, in batch order, as
run-length ranges `[shard_file, first_sample, count]`. A checkpoint carries the segment of
steps since the previous one (committed atomically with it); after the commit the segments are
gathered under `<stage>/ledger/`. `verify` rebuilds the sample sequence over all restarts and
worker counts and checks it against the pure plan: every step as planned, and every sample of
each completed epoch trained exactly once.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_train.data.mixture import Mixture, counts, label, rank_step_ids, source_runs
from dist_train.data.plan import epoch_length, epoch_start, locate

LEDGER_DIR = "ledger"


def compress(ids: list[tuple[str, int]]) -> list[list]:
    """[(file, k), (file, k+1), (other, j)] -> [[file, k, 2], [other, j, 1]], order kept."""
    out: list[list] = []
    for file, k in ids:
        if out and out[-1][0] == file and out[-1][1] + out[-1][2] == k:
            out[-1][2] += 1
        else:
            out.append([file, k, 1])
    return out


def expand(ranges: list[list]) -> list[tuple[str, int]]:
    return [(file, k) for file, first, count in ranges for k in range(first, first + count)]


@dataclass
class Ledger:
    """One rank's records since the last checkpoint."""

    rank: int
    world_size: int
    attempt: float  # the same on every rank of one start (rank 0's start time, broadcast)
    steps: dict[int, list[list]] = field(default_factory=dict)

    def record(self, step: int, ids: list[tuple[str, int]] | None) -> None:
        if ids is not None:
            self.steps[step] = compress(ids)

    def flush(self, ckpt_dir: Path) -> None:
        """Write the pending records into a checkpoint being staged, then start a new segment."""
        if not self.steps:
            return
        first, last = min(self.steps), max(self.steps)
        out = ckpt_dir / LEDGER_DIR
        out.mkdir(parents=True, exist_ok=True)
        name = f"steps_{first:08d}_{last:08d}.attempt_{self.attempt:.6f}.rank_{self.rank:05d}.json"
        (out / name).write_text(json.dumps({"rank": self.rank, "world_size": self.world_size,
                                            "attempt": self.attempt,
                                            "steps": {str(k): v for k, v in sorted(self.steps.items())}}))
        self.steps = {}


def gather(ckpt_dir: Path, stage_dir: Path) -> None:
    """Copy a committed checkpoint's ledger segments to `<stage>/ledger/` (idempotent)."""
    src = ckpt_dir / LEDGER_DIR
    if not src.is_dir():
        return
    dst = stage_dir / LEDGER_DIR
    dst.mkdir(exist_ok=True)
    for seg in src.iterdir():
        if not (dst / seg.name).exists():
            tmp = dst / f".{seg.name}.tmp"
            shutil.copyfile(seg, tmp)
            os.replace(tmp, dst / seg.name)


@dataclass
class Verdict:
    steps: int = 0
    samples: int = 0
    complete_epochs: int = 0
    duplicated: int = 0
    missing: int = 0
    off_plan_steps: int = 0
    rerun_steps: int = 0
    world_sizes: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.duplicated or self.missing or self.off_plan_steps or self.problems)


def load_segments(stage_dir: Path) -> list[dict[str, Any]]:
    """All ledger segments of a stage: gathered ones and those still only in checkpoints."""
    files = {p.name: p for p in (stage_dir / "checkpoints").glob(f"step_*/{LEDGER_DIR}/*.json")}
    files.update({p.name: p for p in (stage_dir / LEDGER_DIR).glob("*.json")})
    return [json.loads(p.read_text()) for _, p in sorted(files.items())]


def verify(stage_dir: Path, mix: Mixture, files: list[list[str]]) -> Verdict:
    """Check the recorded sample sequence of a stage against the plan `mix`.

    `files[i]` names the training shards of source i (index -> file). A step recorded more
    than once (re-run after resuming from an older checkpoint) counts once, from the newest
    record. Completed epochs are counted per source; `complete_epochs` reports the main corpus.
    """
    v = Verdict()
    records: dict[int, dict[float, tuple[int, dict[int, list]]]] = {}  # step -> attempt -> (world, rank -> ranges)
    for seg in load_segments(stage_dir):
        for step_s, ranges in seg["steps"].items():
            world, by_rank = records.setdefault(int(step_s), {}).setdefault(seg["attempt"], (seg["world_size"], {}))
            by_rank[seg["rank"]] = ranges
    if not records:
        v.problems.append(f"no ledger records under {stage_dir}")
        return v
    v.steps = max(records) + 1
    newest = {step: attempts[max(attempts)] for step, attempts in records.items()}
    v.rerun_steps = sum(len(attempts) > 1 for attempts in records.values())
    v.world_sizes = sorted({world for world, _ in newest.values()})
    k = mix.per_lane
    seen: dict[tuple[int, int], Counter] = {}  # (source, epoch) -> sample counts
    for step in range(v.steps):
        if step not in newest:
            v.problems.append(f"step {step} has no record")
            continue
        world, by_rank = newest[step]
        if sorted(by_rank) != list(range(world)):
            v.problems.append(f"step {step}: records from ranks {sorted(by_rank)} of {world}")
            continue
        runs = source_runs(mix, step * k, k)  # (source, source-lane position) of each lane slot
        for rank in range(world):
            got = [f"{file}:{n}" for file, n in expand(by_rank[rank])]
            want = [label(files, *i) for i in rank_step_ids(mix, step, world, rank)]
            if got != want:
                v.off_plan_steps += 1
            if len(got) != len(want):
                v.problems.append(f"step {step} rank {rank}: {len(got)} samples, expected {len(want)}")
                continue
            for j, sample in enumerate(got):
                src, q = runs[j % k]
                seen.setdefault((src, locate(mix.sources[src], q)[0]), Counter())[sample] += 1
                v.samples += 1
    consumed = counts(mix.weights, v.steps * k)  # lane positions each source has filled
    for (src, epoch), samples in sorted(seen.items()):
        spec = mix.sources[src]
        v.duplicated += sum(c - 1 for c in samples.values() if c > 1)
        if epoch_start(spec, epoch) + epoch_length(spec, epoch) <= consumed[src]:  # completed
            v.complete_epochs += src == 0
            v.missing += epoch_length(spec, epoch) * spec.lanes - len(samples)
    return v
