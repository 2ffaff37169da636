"""Statistics a sceptic accepts for "A is faster than B" on a shared, noisy machine.

Each system runs several times in alternating order; a run's figure is its steady-state rate. The
claim is about the ratio of the two medians, with a percentile bootstrap interval (the runs of each
system resampled independently), and a verdict against a goal that says "not distinguishable" when
the interval straddles it.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Ratio:
    """median(a) / median(b), and its bootstrap interval at `level`."""

    value: float
    low: float
    high: float
    level: float
    runs: tuple[int, int]

    def verdict(self, goal: float) -> str:
        """"met" when the whole interval is at or above `goal`, "not met" when it is below, otherwise
        "not distinguishable" (the runs cannot tell; more repeats might)."""
        if self.low >= goal:
            return "met"
        if self.high < goal:
            return "not met"
        return "not distinguishable"

    def text(self) -> str:
        return f"{self.value:.2f} [{self.low:.2f}, {self.high:.2f}]"


def ratio_of_medians(a: list[float], b: list[float], *, level: float = 0.95, resamples: int = 10_000,
                     seed: int = 0) -> Ratio:
    """The ratio of the medians of two samples with a percentile bootstrap interval; deterministic
    for a given seed. With one run per side the interval is the point itself: say so, do not claim."""
    if not a or not b:
        raise ValueError("ratio_of_medians needs at least one run on each side")
    rng = random.Random(seed)
    point = statistics.median(a) / statistics.median(b)
    draws = sorted(statistics.median(rng.choices(a, k=len(a))) / statistics.median(rng.choices(b, k=len(b)))
                   for _ in range(resamples))
    tail = (1 - level) / 2
    low = draws[int(tail * (resamples - 1))]
    high = draws[int((1 - tail) * (resamples - 1))]
    return Ratio(point, low, high, level, (len(a), len(b)))
