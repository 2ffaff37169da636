"""Heartbeats: every rank shows it is alive; a frozen, stopped or vanished rank is named within a bound.

A daemon thread on each rank writes `<stage>/heartbeat/rank_NNNNN.json` every `timeout/6` seconds
(rank, host, Ray node id, pid, step, phase, a sequence number). It keeps beating while the main thread waits in
a collective, so only a rank that is stopped (SIGSTOP, a frozen node), dead or cut off goes quiet.
Rank 0 watches every rank and the others watch rank 0 (O(ranks) reads per interval in all). Staleness
is judged by the watcher's own monotonic clock (when it last saw the sequence number change), so
clock skew between nodes does not matter.

When a watched rank has been quiet for `timeout_s`, the watcher prints one line naming it, records
it in `<stage>/incidents.jsonl` (the driver quotes it when the stage fails) and exits its own process:
the driver then sees the attempt fail and restarts the stage (ray.max_failures) or fails the run,
and the stuck process is killed with the group instead of holding everyone in a collective.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from dist_train.outputs import INCIDENTS, read_jsonl
from dist_train.world import World

STUCK_EXIT = 43  # the watcher's exit status: distinguishes "named a stuck rank" from a crash


def read_incidents(stage_dir: Path, since: float = 0.0) -> list[dict]:
    """Incidents recorded after `since` (unix time), oldest first."""
    return [r for r in read_jsonl(stage_dir / INCIDENTS) if r.get("time", 0) >= since]


def record_incident(stage_dir: Path, kind: str, message: str, **fields: object) -> None:
    """Append one incident to `<stage>/incidents.jsonl`, synced to storage: the process that
    records it is usually about to end. A storage that refuses it costs the record, not the run."""
    row = {"time": time.time(), "kind": kind, "message": message, **fields}
    try:
        with open(stage_dir / INCIDENTS, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        pass


def last_step(stage_dir: Path, attempt: float) -> int | None:
    """The furthest step any rank reported in a heartbeat of `attempt` (the driver's id of one start)."""
    steps = []
    for path in (stage_dir / "heartbeat").glob("rank_*.json"):
        try:
            row = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(row, dict) and row.get("attempt") == attempt and isinstance(row.get("step"), int):
            steps.append(row["step"])
    return max(steps, default=None)


class Heartbeat:
    """Beats for this rank and watches its peers; see the module docstring."""

    def __init__(self, stage_dir: Path, world: World, attempt: float, timeout_s: float) -> None:
        self.dir, self.world, self.attempt, self.timeout_s = stage_dir / "heartbeat", world, attempt, timeout_s
        self.stage_dir = stage_dir
        self.interval = min(max(timeout_s / 6, 0.2), 10.0)
        self.step, self.phase, self.seq = 0, "setup", 0
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dist-train-heartbeat", daemon=True)
        peers = range(1, world.world_size) if world.is_main else [0]
        now = time.monotonic()
        self._seen: dict[int, tuple[int, float, dict]] = {r: (-1, now, {}) for r in peers}

    def start(self) -> Heartbeat:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._beat()
        self._thread.start()
        return self

    def progress(self, step: int, phase: str = "train") -> None:
        """Called by the main thread: what it is doing now (no I/O here)."""
        self.step, self.phase = step, phase

    def stop(self) -> None:
        """Stop beating and tell the watchers this rank is done (not stuck)."""
        self.phase = "done"
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._beat()

    def others_behind(self) -> str:
        """Ranks whose last heartbeat (this attempt) shows another step or phase than this rank's:
        the likely culprits when a collective times out. Reads every rank's file (rare: on failure)."""
        odd = []
        for rank in range(self.world.world_size):
            if rank == self.world.rank:
                continue
            try:
                row = json.loads(self._path(rank).read_text())
            except (OSError, ValueError):
                odd.append(f"rank {rank}: no heartbeat")
                continue
            if row.get("attempt") != self.attempt:
                odd.append(f"rank {rank}: no heartbeat in this attempt")
            elif (row["step"], row["phase"]) != (self.step, self.phase):
                odd.append(f"rank {rank}: {row['phase']} at step {row['step']} (pid {row['pid']} on {row['host']})")
        return "; ".join(odd) or "every rank reports the same step"

    def _path(self, rank: int) -> Path:
        return self.dir / f"rank_{rank:05d}.json"

    def _beat(self) -> bool:
        """Write this rank's beat; False when the storage refuses it (full, read-only)."""
        self.seq += 1
        row = {"rank": self.world.rank, "host": self.host, "node": self.world.node, "pid": os.getpid(),
               "attempt": self.attempt,
               "seq": self.seq, "step": self.step, "phase": self.phase, "time": time.time()}
        tmp = self._path(self.world.rank).with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(row))
            os.replace(tmp, self._path(self.world.rank))
        except OSError:
            return False
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            # When this rank cannot write its own beat, the storage is at fault (the checkpoint
            # save reports that), and peers' silent files prove nothing: judge no one.
            stuck = self._check() if self._beat() else None
            if stuck is not None:
                self._report(*stuck)

    def _check(self) -> tuple[int, str] | None:
        now = time.monotonic()
        for rank, (seq, seen_at, row) in self._seen.items():
            try:
                current = json.loads(self._path(rank).read_text())
            except (OSError, ValueError):
                current = {}
            if current.get("attempt") == self.attempt and current.get("seq") != seq:
                self._seen[rank] = (current["seq"], now, current)
                continue
            if row.get("phase") == "done":
                continue
            quiet = now - seen_at
            if quiet > self.timeout_s:
                where = (f"pid {row['pid']} on {row['host']}, last seen in {row['phase']} at step {row['step']}"
                         if row else "it never sent a heartbeat in this attempt")
                return rank, (f"rank {rank} is not responding: no heartbeat for {quiet:.0f} s ({where}); it is "
                              f"stopped, frozen or dead. Rank {self.world.rank} ends its worker so the group "
                              "restarts (ray.max_failures) or fails; ray.heartbeat_timeout_s sets this bound")
        return None

    def _report(self, stuck_rank: int, message: str) -> None:
        """End this worker. Every healthy rank sees the stuck one and ends its worker, but only one of
        them, the lowest rank other than the stuck one, says so: on 64 ranks, one line and one
        incident, not 63."""
        try:
            if self.world.rank == (1 if stuck_rank == 0 else 0):
                print(f"[heartbeat] {message}", flush=True)
                record_incident(self.stage_dir, "stuck_rank", message, reporter=self.world.rank,
                                attempt=self.attempt)
        finally:
            os._exit(STUCK_EXIT)
