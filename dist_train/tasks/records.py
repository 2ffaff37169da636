"""Labeled records for fine-tuning: read from jsonl, csv, parquet or a saved HF datasets directory,
and split deterministically when only one file is given.

Records are plain dicts. Errors are one line naming the file, the problem and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING, Any

from dist_train.data.manifest import DataError
from dist_train.tasks import task_fields

if TYPE_CHECKING:
    from dist_train.config.schema import RunConfig


def read_records(path: str, fields: list[str], keep_all: bool = False) -> list[dict[str, Any]]:
    """Every row of `path` (jsonl/json, csv, parquet, or a `save_to_disk` directory), checked to
    hold `fields`; rows keep only those fields (`keep_all`: every field of the file)."""
    from dist_train.data.build import expand_inputs, open_table

    try:
        kind, files = expand_inputs(path)
    except (DataError, ValueError) as e:
        raise DataError(f"labeled data {path!r}: {e}") from None
    if kind == "text":
        raise DataError(f"labeled data {path!r} is plain text: give jsonl, csv, parquet or a saved dataset")
    ds = open_table(kind, files, f"labeled data {path!r}")
    missing = [f for f in fields if f not in ds.column_names]
    if missing:
        raise DataError(f"labeled data {path!r} has no field {missing[0]!r} (fields: {ds.column_names}): set the "
                        f"finetune.data field names to match")
    rows = (ds if keep_all else ds.select_columns(fields)).to_list()
    if not rows:
        raise DataError(f"labeled data {path!r} is empty: add examples")
    for i, row in enumerate(rows):
        empty = [f for f in fields if row[f] is None]
        if empty:
            raise DataError(f"labeled data {path!r} row {i + 1} has an empty {empty[0]!r}: fill or drop that row")
    return rows


def split_records(rows: list[dict[str, Any]], seed: int, validation: float, test: float
                  ) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test) drawn from one list by a hash of (seed, row index): the same
    split every time, on every machine, whatever the worker count."""
    parts: tuple[list[dict], list[dict], list[dict]] = ([], [], [])
    for i, row in enumerate(rows):
        u = int(hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()[:12], 16) / 16**12
        parts[2 if u < test else 1 if u < test + validation else 0].append(row)
    if not parts[0]:
        raise DataError("the validation and test fractions leave no training examples: lower them")
    return parts


def task_spec(cfg: RunConfig) -> dict[str, Any]:
    """What a task needs from the config (plain data; also stored with the export)."""
    sec = cfg.finetune
    return {**dataclasses.asdict(sec.data), "label_smoothing": sec.label_smoothing,
            "class_weights": sec.class_weights}


def read_splits(cfg: RunConfig) -> tuple[list[dict], list[dict] | None, list[dict] | None]:
    """(train, validation, test) records: the given files, or deterministic splits of train."""
    data = cfg.finetune.data
    fields = task_fields(cfg.finetune.task, task_spec(cfg))
    train = read_records(data.train, fields)
    val = read_records(data.validation, fields) if data.validation else None
    test = read_records(data.test, fields) if data.test else None
    if (val is None and data.validation_fraction) or (test is None and data.test_fraction):
        train, v, t = split_records(train, cfg.seed, 0.0 if val is not None else data.validation_fraction,
                                    0.0 if test is not None else data.test_fraction)
        val = val if val is not None else v or None
        test = test if test is not None else t or None
    return train, val, test
