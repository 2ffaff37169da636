"""Did adaptation help? Two models' test-set metrics, compared by a paired bootstrap.

Each model's evaluation leaves the summable statistics of every test example (the vector a task's
`stats` gives for that example alone), stored sparsely: a task's metric of any multiset of examples
is its `metrics` of their summed statistics. A bootstrap resample draws the examples once and sums
both models' statistics with the same counts, so the interval is of the paired difference. Pure numpy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ExampleStats:
    """Per-example statistics as (example, column, value) triplets over `examples` × `dim`."""

    examples: int
    dim: int
    rows: np.ndarray
    cols: np.ndarray
    vals: np.ndarray

    @classmethod
    def from_dense(cls, per_example: dict[int, np.ndarray], examples: int) -> ExampleStats:
        dim = len(next(iter(per_example.values()))) if per_example else 0
        rows, cols, vals = [], [], []
        for i in sorted(per_example):
            nz = np.flatnonzero(per_example[i])
            rows.append(np.full(len(nz), i))
            cols.append(nz)
            vals.append(per_example[i][nz])
        def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

        return cls(examples, dim, cat(rows, np.int64), cat(cols, np.int64), cat(vals, np.float64))

    @classmethod
    def merged(cls, parts: list[ExampleStats]) -> ExampleStats:
        """The statistics of disjoint sets of examples (each rank's share) as one."""
        return cls(max(p.examples for p in parts), max(p.dim for p in parts),
                   np.concatenate([p.rows for p in parts]), np.concatenate([p.cols for p in parts]),
                   np.concatenate([p.vals for p in parts]))

    def summed(self, counts: np.ndarray) -> np.ndarray:
        """The statistics of a resample that takes example i counts[i] times."""
        return np.bincount(self.cols, weights=self.vals * counts[self.rows], minlength=self.dim)

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(tmp, examples=self.examples, dim=self.dim, rows=self.rows, cols=self.cols, vals=self.vals)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> ExampleStats:
        z = np.load(path, allow_pickle=False)
        return cls(int(z["examples"]), int(z["dim"]), z["rows"], z["cols"], z["vals"])


def paired_bootstrap(adapted: ExampleStats, base: ExampleStats, metrics: Callable[[np.ndarray], dict[str, Any]],
                     metric: str, higher_is_better: bool, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The metric of both models on the whole test set, their difference (adapted - base) and its
    95% percentile interval over `resamples` paired resamples, with a verdict: helped when the whole
    interval lies on the better side, hurt when on the worse side, else no clear difference."""
    if adapted.examples != base.examples or adapted.dim != base.dim:
        raise ValueError(f"the two test evaluations differ in size ({adapted.examples} vs {base.examples} "
                         "examples): they must be of the same test set")
    n = adapted.examples
    ones = np.ones(n)
    a, b = float(metrics(adapted.summed(ones))[metric]), float(metrics(base.summed(ones))[metric])
    rng = np.random.default_rng([seed, 7])
    diffs = np.empty(resamples)
    for r in range(resamples):
        counts = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        diffs[r] = metrics(adapted.summed(counts))[metric] - metrics(base.summed(counts))[metric]
    # a resample can leave a metric undefined (a correlation of constant values): it is left out, and counted
    lo, hi = (float(x) for x in np.nanpercentile(diffs, [2.5, 97.5]))
    better, worse = (lo > 0, hi < 0) if higher_is_better else (hi < 0, lo > 0)
    verdict = "helped" if better else "hurt" if worse else "no_clear_difference"
    return {"metric": metric, "higher_is_better": higher_is_better, "adapted": a, "base": b, "difference": a - b,
            "ci95": [lo, hi], "resamples": resamples, "undefined_resamples": int(np.isnan(diffs).sum()), "examples": n,
            "verdict": verdict}


def sentence(c: dict[str, Any]) -> str:
    """One line for people: what adaptation did to the test metric, with the interval."""
    lo, hi = c["ci95"]
    what = {"helped": "adaptation helped", "hurt": "adaptation hurt",
            "no_clear_difference": "no clear difference from adaptation"}[c["verdict"]]
    return (f"{what}: test {c['metric']} {c['adapted']:.4g} adapted vs {c['base']:.4g} unadapted "
            f"({c['difference']:+.4g}, 95% CI {lo:+.4g} to {hi:+.4g}, {c['examples']} examples)")
