"""Progress for the long phases that are not training steps: data build, evaluation, export.

On an interactive terminal it is a live tqdm bar. Anywhere else (Ray worker output, Slurm's
.out files, CI logs) a bar's carriage returns turn into one unreadable line, so it prints a plain
line at most every `every_s` seconds, and one line when the phase ends with its count and time.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

from dist_train.ray_internals import in_ray_worker

EVERY_S_ENV = "DIST_TRAIN_PROGRESS_EVERY_S"  # the driver passes logging.console_every_s to workers this way
# Set by the driver when its own terminal is interactive: a worker's output is never a terminal, but
# Ray can draw a worker's bar at the driver (ray.experimental.tqdm_ray).
DRIVER_TTY_ENV = "DIST_TRAIN_DRIVER_TTY"


def default_every_s() -> float:
    try:
        return float(os.environ.get(EVERY_S_ENV, "30"))
    except ValueError:
        return 30.0


class Progress:
    """Counts units of one phase; `enabled=False` (other ranks, tests) prints nothing at all."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "", enabled: bool = True,
                 every_s: float | None = None, stream: TextIO | None = None) -> None:
        self.desc, self.total, self.unit, self.enabled = desc, total, unit, enabled
        self.every_s = default_every_s() if every_s is None else every_s
        self.stream = stream or sys.stderr
        self.n = 0
        self.t0 = self.last = time.perf_counter()
        self.bar: Any = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc=desc, total=total, unit=f" {unit}" if unit else "it", file=self.stream,
                            leave=False, dynamic_ncols=True)
        elif enabled and os.environ.get(DRIVER_TTY_ENV) == "1" and in_ray_worker():
            from ray.experimental.tqdm_ray import tqdm as ray_tqdm

            self.bar = ray_tqdm(desc=desc, total=total, unit=unit or "it")

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            print(f"{self.desc}: {self._count()} ({now - self.t0:.0f} s)", file=self.stream, flush=True)

    def close(self, note: str = "") -> None:
        """Ends the phase with one summary line (a bar is removed and replaced by it)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elapsed = time.perf_counter() - self.t0
        print(f"{self.desc}: {self._count()} in {elapsed:.1f} s{note}", file=self.stream, flush=True)

    def _count(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            return f"{self.n}/{self.total}{unit} ({self.n / self.total:.0%})"
        return f"{self.n}{unit}"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        elif self.bar is not None:
            self.bar.close()


