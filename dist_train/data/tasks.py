"""Labeled data for fine-tuning: reading, label sets, and the pure per-step sample plan.

The order of training examples in an epoch is a function of (seed, epoch, n) only; step s of
the run takes the next global_batch examples, split evenly over ranks, so the plan is the
same on any worker count. Evaluation shards are padded to equal length per rank (padding has
weight 0) so that every rank runs the same number of forward passes.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_train.data.manifest import DataError


@dataclass(frozen=True)
class Example:
    text: str
    label: str


def read_labeled(path: str, text_field: str, label_field: str) -> list[Example]:
    """Read a jsonl file of labeled examples; one-line errors name the file, line and fix."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"labeled data file {path!r} not found: check finetune.data paths")
    out = []
    with open(p) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path}:{lineno} is not valid JSON: one JSON object per line") from None
            if text_field not in row or label_field not in row:
                raise DataError(f"{path}:{lineno} lacks field {text_field!r} or {label_field!r} "
                                f"(has {sorted(row)}): set finetune.data.text_field / label_field")
            out.append(Example(str(row[text_field]), str(row[label_field])))
    if not out:
        raise DataError(f"labeled data file {path!r} is empty: add examples")
    return out


def label_set(train: list[Example]) -> list[str]:
    """The classes, sorted, as read from the training data (ids follow this order)."""
    labels = sorted({ex.label for ex in train})
    if len(labels) < 2:
        raise DataError(f"the training data has {len(labels)} class(es): classification needs at least 2")
    return labels


def majority_label(train: list[Example]) -> str:
    return Counter(ex.label for ex in train).most_common(1)[0][0]


def steps_per_epoch(n: int, global_batch: int) -> int:
    if n < global_batch:
        raise DataError(f"{n} training examples are fewer than one global batch of {global_batch}: "
                        "lower finetune.train.global_batch_size or add data")
    return n // global_batch


def step_indices(step: int, n: int, global_batch: int, seed: int, world_size: int, rank: int) -> list[int]:
    """Example indices rank `rank` trains on at global step `step` (0-based). Pure."""
    spe = steps_per_epoch(n, global_batch)
    epoch, in_epoch = divmod(step, spe)
    order = np.random.default_rng([seed, epoch, 1]).permutation(n)
    batch = order[in_epoch * global_batch:(in_epoch + 1) * global_batch]
    per_rank = global_batch // world_size
    return [int(i) for i in batch[rank * per_rank:(rank + 1) * per_rank]]


def eval_shard(n: int, world_size: int, rank: int) -> list[tuple[int, float]]:
    """(index, weight) pairs of a rank's evaluation share; equal length on every rank."""
    per_rank = -(-n // world_size)
    own = list(range(rank, n, world_size))
    return [(i, 1.0) for i in own] + [(0, 0.0)] * (per_rank - len(own))
