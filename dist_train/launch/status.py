"""OUTPUT_DIR/run.json: what the driver is doing, for `dist-train runs` and `dist-train report`.

The driver writes it when the run starts, at each stage, every `TICK_S` while it runs (so a
driver that was killed leaves a stale `updated`), and with the outcome at the end: completed,
preempted (a checkpoint was committed on request) or failed (with the error's line).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dist_train.outputs import STATUS, write_atomic

TICK_S = 30.0


def outcome(e: BaseException | None) -> str:
    """The final state a run ends in: completed, preempted (stopped on request, after a checkpoint) or failed."""
    if e is None:
        return "completed"
    from dist_train.launch.driver import Preempted  # the driver imports this module

    return "preempted" if isinstance(e, Preempted) else "failed"


class RunStatus:
    def __init__(self, out: Path, stages: list[str], max_steps: dict[str, int]) -> None:
        self.out = out
        self.lock = threading.Lock()
        self.data: dict[str, Any] = {"state": "running", "stage": None, "stages": stages, "max_steps": max_steps,
                                     "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        self.write()

    def write(self, **fields: Any) -> None:
        with self.lock:
            self.data.update(fields, updated=time.time())
            write_atomic(self.out / STATUS, json.dumps(self.data, indent=1))


@contextlib.contextmanager
def run_status(out: Path, stages: list[str], max_steps: dict[str, int]) -> Iterator[RunStatus]:
    """run.json for the duration of the block, ending in its outcome."""
    status = RunStatus(out, stages, max_steps)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(TICK_S):
            status.write()

    thread = threading.Thread(target=tick, name="run-status", daemon=True)
    thread.start()
    try:
        yield status
    except BaseException as e:
        status.write(state=outcome(e),
                     error=str(e).strip().splitlines()[-1][:500] if str(e).strip() else type(e).__name__)
        raise
    else:
        status.write(state=outcome(None))
    finally:  # a tick after the final write keeps the final state: write() only merges fields
        stop.set()
        thread.join()
