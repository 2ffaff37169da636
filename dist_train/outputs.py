"""The names of the files a run writes under output_dir, a reader for its JSON-lines files, and
the atomic write of its small files.

One place for the layout that the driver, the workers, `dist-train report`, `dist-train runs`
and the trackers all read; it imports nothing heavy, so the read-only commands start fast.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

REPORT = "report.json"  # OUTPUT_DIR: resolved config, each stage's result, timings
LOCK = "run.lock"  # OUTPUT_DIR: held by the driver of the run in progress (launch/lock.py)
STATUS = "run.json"  # OUTPUT_DIR: the driver's state (launch/status.py)
TRACKERS = "trackers.json"  # OUTPUT_DIR: tracker run ids and how far metrics were sent
METRICS = "metrics.jsonl"  # OUTPUT_DIR/<stage>: one row per log interval
ATTEMPTS = "attempts.json"  # OUTPUT_DIR/<stage>: wall time of each attempt at the stage, for goodput
RESULT = "result.json"  # OUTPUT_DIR/<stage>: the stage's entry of report.json
INCIDENTS = "incidents.jsonl"  # OUTPUT_DIR/<stage>: stuck ranks, and the errors that ended a worker
TEST_STATS = "test_stats.npz"  # OUTPUT_DIR/finetune: per-example test statistics (finetune.compare_base)
COMPARE_BASE = "compare_base"  # OUTPUT_DIR/compare_base/: the unadapted model's fine-tune (finetune.compare_base)


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    """The rows of JSON-lines text. A line a crash cut short (and the next attempt's row appended
    to it) is skipped, not an error: every other row still counts."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return parse_jsonl(path.read_text()) if path.is_file() else []


def read_attempts(path: Path) -> list[dict[str, float]]:
    """The attempts recorded in an ATTEMPTS file ({start, end} wall times); an entry or a file that is
    damaged is left out (it would only skew goodput), never an error."""
    try:
        raw = json.loads(path.read_text()) if path.is_file() else []
    except (OSError, ValueError):
        return []
    if not isinstance(raw, list):
        return []
    return [{"start": float(a["start"]), "end": float(a["end"])} for a in raw if isinstance(a, dict)
            and all(isinstance(a.get(k), (int, float)) and not isinstance(a.get(k), bool) for k in ("start", "end"))]


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_safe(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by None: what strict JSON (and `json.dumps(...,
    allow_nan=False)`) accepts. A diverged run's losses are NaN; a script must still parse its report."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def dumps_strict(obj: Any) -> str:
    """One line of strict JSON for scripts (--json outputs)."""
    return json.dumps(json_safe(obj), allow_nan=False)


def write_atomic(path: Path, text: str) -> None:
    """Replace a small file atomically: readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
