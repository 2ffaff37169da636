"""Read what a run left in its output_dir: status, report, metrics, attempts, checkpoints, heartbeats.

Everything here is read-only and tolerant: a run that is still going, was killed, or predates a
file gives what it has, and missing pieces are None or empty, never an error. Only a directory
that holds no run at all is an error (`NotARun`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_train.config.schema import STAGES
from dist_train.outputs import ATTEMPTS, INCIDENTS, METRICS, REPORT, RESULT, STATUS, read_attempts, read_jsonl


class NotARun(ValueError):
    """The directory holds no dist-train run."""


def _json(path: Path, kind: type = dict) -> Any:
    """A run file's JSON value of `kind` (an object, or a list); None when it is missing, unreadable, not
    JSON or of another kind (damaged)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, kind) else None


@dataclass
class Checkpoint:
    tag: str
    step: int
    time: float | None
    size_bytes: int
    world_size: int | None
    eval: dict[str, float]


@dataclass
class StageData:
    name: str
    rows: list[dict[str, Any]]  # metrics.jsonl, in the order written (restarts re-log re-done steps)
    attempts: list[dict[str, float]]  # wall-clock start/end of each start of the worker group
    result: dict[str, Any] | None  # result.json: the stage's entry of report.json
    checkpoints: list[Checkpoint]
    latest: str | None
    best: str | None
    heartbeat: dict[str, Any] | None  # the freshest rank heartbeat: step, phase, time
    incidents: list[dict[str, Any]]  # stuck ranks the heartbeat reported, errors that ended a worker
    unreadable: list[str] = field(default_factory=list)  # files that exist but do not parse (cut short?)

    @property
    def last_step(self) -> int:
        steps = [r["step"] for r in self.rows[-1:]]
        if self.heartbeat and isinstance(self.heartbeat.get("step"), int):
            steps.append(self.heartbeat["step"])
        return max(steps, default=0)

    def resume_points(self) -> list[tuple[int, float | None]]:
        """(step, time) of the first row of each restart: where a new attempt took over."""
        points = []
        for prev, row in zip(self.rows, self.rows[1:], strict=False):
            new_attempt = row.get("attempt") != prev.get("attempt") if "attempt" in row else row["step"] <= prev["step"]
            if new_attempt:
                points.append((row["step"], row.get("time")))
        return points

    @property
    def evals(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if any(k.startswith("eval_") for k in r)]

    @property
    def train_rows(self) -> list[dict[str, Any]]:
        """The rows of training steps (not the step-0 baseline, an evaluation alone)."""
        return [r for r in self.rows if "loss" in r]


@dataclass
class RunData:
    out: Path
    status: dict[str, Any] | None  # run.json
    report: dict[str, Any] | None  # report.json
    config: dict[str, Any]
    stages: dict[str, StageData] = field(default_factory=dict)

    @property
    def updated(self) -> float:
        """The newest sign of life: status tick, metrics row or heartbeat."""
        times = [self.status.get("updated", 0.0)] if self.status else []
        for s in self.stages.values():
            times += [r.get("time", 0.0) for r in s.rows[-1:]]
            times += [s.heartbeat.get("time", 0.0)] if s.heartbeat else []
            times += [a.get("end", 0.0) for a in s.attempts[-1:] if isinstance(a, dict)]
        times = [t for t in times if isinstance(t, (int, float)) and t > 0]  # a damaged entry says nothing
        if not times:
            times = [p.stat().st_mtime for p in (self.out / REPORT, self.out / STATUS) if p.exists()]
        return max(times, default=self.out.stat().st_mtime)

    def max_steps(self, stage: str) -> int | None:
        if self.status and stage in self.status.get("max_steps", {}):
            return self.status["max_steps"][stage]
        section = self.config.get(stage) or {}
        return (section.get("train") or {}).get("max_steps")


def read_checkpoints(root: Path) -> tuple[list[Checkpoint], str | None, str | None]:
    found = []
    for meta_path in sorted(root.glob("step_*/meta.json")):
        meta = _json(meta_path)
        if not meta:
            continue
        files = meta.get("files") or {}
        found.append(Checkpoint(tag=meta_path.parent.name, step=int(meta.get("step", 0)), time=meta.get("time"),
                                size_bytes=sum(int(f.get("size", 0)) for f in files.values()),
                                world_size=meta.get("world_size"),
                                eval={k: v for k, v in (meta.get("eval") or {}).items()
                                      if isinstance(v, (int, float))}))

    def pointer(name: str) -> str | None:
        try:
            return (root / name).read_text().strip() or None
        except OSError:
            return None

    return found, pointer("latest"), pointer("best")


def read_stage(out: Path, stage: str) -> StageData | None:
    d = out / stage
    if not d.is_dir():
        return None
    beats = [b for b in (_json(p) for p in (d / "heartbeat").glob("rank_*.json")) if b]
    checkpoints, latest, best = read_checkpoints(d / "checkpoints")
    result = _json(d / RESULT)
    return StageData(name=stage, rows=read_jsonl(d / METRICS), attempts=read_attempts(d / ATTEMPTS),
                     result=result if isinstance(result, dict) else None, checkpoints=checkpoints, latest=latest,
                     best=best, heartbeat=max(beats, key=lambda b: b.get("time", 0.0)) if beats else None,
                     incidents=read_jsonl(d / INCIDENTS),
                     unreadable=[f"{stage}/{RESULT}"] if (d / RESULT).is_file() and not isinstance(result, dict)
                     else [])


def load_run(out: str | Path) -> RunData:
    out = Path(out)
    if not out.is_dir():
        raise NotARun(f"{out} is not a directory: pass a run's output_dir")
    status, report = _json(out / STATUS), _json(out / REPORT)
    stages = {s: data for s in STAGES if (data := read_stage(out, s)) is not None}
    if status is None and report is None and not stages and not (out / STATUS).exists() \
            and not (out / REPORT).exists():
        raise NotARun(f"{out} holds no dist-train run (no run.json, report.json or stage directories): pass the "
                      "output_dir of a run")
    config = (report or {}).get("config") or {}
    if not config:
        for s in stages.values():  # a run without report.json yet: the config its checkpoints recorded
            meta = _json(out / s.name / "checkpoints" / s.latest / "meta.json") if s.latest else None
            if meta and meta.get("config"):
                config = meta["config"]
                break
    return RunData(out=out, status=status, report=report, config=config, stages=stages)


def age(seconds_ago: float) -> str:
    """'42s', '7m', '3h', '5d': how long ago."""
    s = max(0.0, time.time() - seconds_ago)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit}"
    return f"{s:.0f}s"
