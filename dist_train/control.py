"""Requests from the driver to a running stage, as files under OUTPUT_DIR/_control/.

A file is the one channel that reaches workers on every launcher (local Ray, a Ray cluster, Slurm)
without a connection of its own: output_dir is shared storage already, for the checkpoints. Rank 0
looks once per step (one stat) and shares the answer through the step's all-reduce.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

PREEMPT = "preempt"
REQUEUE_EXIT = 75  # EX_TEMPFAIL: "try again later"; slurm/dist-train.sbatch requeues on it


def _path(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / "_control" / name


def request_preemption(output_dir: str | Path, reason: str) -> None:
    """Ask the workers to checkpoint at the next step boundary and stop."""
    path = _path(output_dir, PREEMPT)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"time": time.time(), "reason": reason}))


def preemption_requested(output_dir: str | Path) -> bool:
    """A request to this run, or to the run it is nested in (finetune.compare_base's OUTPUT_DIR/compare_base/
    stops with its parent)."""
    return _path(output_dir, PREEMPT).is_file() or _path(Path(output_dir).parent, PREEMPT).is_file()


def clear(output_dir: str | Path) -> None:
    """Forget requests of an earlier run (called by the driver before a run starts)."""
    _path(output_dir, PREEMPT).unlink(missing_ok=True)
