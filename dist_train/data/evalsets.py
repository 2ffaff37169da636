"""The held-out sets continued pretraining is measured on: which they are, and their samples.

A set is a shard source (its validation split, or its training split when it has none) or a text
corpus that the driver packs once, with the stage's tokenizer, into OUTPUT_DIR/pretrain/eval_sets/.
The samples of a set are its first `limit` samples in manifest order: the same at every evaluation,
on any worker count. Which rank evaluates which sample is `data.tasks.eval_shard`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dist_train.data.manifest import DataError, Manifest, ShardInfo, read_manifest

NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,39}$")
BUILT_DIR = "eval_sets"  # under OUTPUT_DIR/pretrain: the text corpora packed at start
SOURCE_FILE = "source.json"  # beside a packed corpus's manifest: what it was built from
CORPUS_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet", ".csv")


@dataclass(frozen=True)
class EvalSource:
    name: str
    role: str  # "domain" | "general"
    path: str  # shard source, or the text corpus to pack
    text_field: str = "text"
    default: bool = False  # a corpus the run trains on: evaluated on its validation split only, if it has one
    key: str = "pretrain.eval.sets"  # the config key that defines it, for messages

    @property
    def is_corpus(self) -> bool:
        return is_corpus(self.path)


def is_corpus(path: str) -> bool:
    """A text corpus to pack (a file, or a glob of files) rather than a shard directory."""
    return "://" not in path and (path.endswith(CORPUS_SUFFIXES) or any(c in path for c in "*?["))


def mix_name(given: str | None, i: int, count: int) -> str:
    """The name of mix source i of `count`: its own, or general (general_2, ... when several)."""
    return given or ("general" if count == 1 else f"general_{i + 1}")


def eval_sources(cfg: Any) -> list[EvalSource]:
    """The sets of pretrain.eval.sets, or the default ones (the main corpus as domain, every mix
    source as general); raises DataError on a bad or repeated name."""
    sec = cfg.pretrain
    if sec.eval.sets:
        sources = [EvalSource(s.name, s.role, s.path, s.text_field, key=f"pretrain.eval.sets[{i}]")
                   for i, s in enumerate(sec.eval.sets)]
    else:
        mix = sec.data.mix
        sources = [EvalSource("domain", "domain", sec.data.shards, default=True, key="pretrain.data.shards")]
        sources += [EvalSource(mix_name(m.name, i, len(mix)), "general", m.shards, default=True,
                               key=f"pretrain.data.mix[{i}]") for i, m in enumerate(mix)]
    seen: dict[str, str] = {}
    for s in sources:
        if not NAME.match(s.name):
            raise DataError(f"{s.key}: evaluation set name {s.name!r} must start with a letter and hold only letters, "
                            "digits, _ and - (at most 40): rename it")
        if s.name in seen:
            raise DataError(f"{s.key} and {seen[s.name]} both give an evaluation set named {s.name!r} (the main "
                            "corpus's is named domain): give each its own name")
        seen[s.name] = s.key
    if not any(s.role == "domain" for s in sources):
        raise DataError("pretrain.eval.sets has no set with role: domain, so nothing measures the adaptation: "
                        "add one (e.g. the main corpus)")
    return sources


def check_corpus(s: EvalSource) -> None:
    """A text-corpus set, before anything starts: its files exist, are of a kind `data build` reads, are not
    all empty, and (jsonl, csv, parquet) hold the text field."""
    import csv
    import glob

    files = sorted(glob.glob(s.path)) if any(c in s.path for c in "*?[") else [s.path] * Path(s.path).is_file()
    if not files:
        raise DataError(f"{s.key}: {s.path!r} matches no file: fix its path")
    odd = [f for f in files if not f.endswith(CORPUS_SUFFIXES)]
    if odd:
        raise DataError(f"{s.key}: {odd[0]!r} is not a {'/'.join(CORPUS_SUFFIXES)} file: give text files only")
    nonempty = [f for f in files if Path(f).stat().st_size > 0]
    if not nonempty:
        raise DataError(f"{s.key}: every file of {s.path!r} is empty: point it at the held-out text")
    first = nonempty[0]
    fields: list[str] | None = None
    if first.endswith((".jsonl", ".json")):
        with open(first, encoding="utf-8", errors="replace") as f:
            line = next((ln for ln in f if ln.strip()), "")
        try:
            record = json.loads(line)
        except ValueError:
            raise DataError(f"{s.key}: the first record of {first} is not JSON: give one JSON object per "
                            "line") from None
        fields = list(record) if isinstance(record, dict) else []
    elif first.endswith(".csv"):
        with open(first, newline="", encoding="utf-8", errors="replace") as f:
            fields = next(csv.reader(f), [])
    elif first.endswith(".parquet"):
        import pyarrow.parquet as pq

        fields = pq.read_schema(first).names
    if fields is not None and s.text_field not in fields:
        raise DataError(f"{s.key}: {first} has no field {s.text_field!r} (fields: {fields[:8]}): set its text_field")


def check_shard_path(s: EvalSource) -> None:
    """A directory of text files given where shards are expected: say how to name them."""
    p = Path(s.path)
    if p.is_dir() and not (p / "manifest.json").is_file() and any(
            f.suffix in CORPUS_SUFFIXES for f in p.iterdir()):
        raise DataError(f"{s.key}: {s.path!r} holds text files, not shards: give them as a glob, e.g. "
                        f"{s.path.rstrip('/')}/*.jsonl, and the run packs them")


def built_dir(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / "pretrain" / BUILT_DIR / name


def shard_source(s: EvalSource, output_dir: str | Path) -> str:
    """Where the set's shards are read from (a packed corpus lives under output_dir)."""
    return str(built_dir(output_dir, s.name)) if s.is_corpus else s.path


def pack_corpus(s: EvalSource, output_dir: str | Path, tokenizer_name: str, seq_len: int,
                progress: bool = True) -> Manifest:
    """Pack a text-corpus set with the stage's tokenizer (once: kept while its inputs, tokenizer and
    seq_len are unchanged). Only this directory, which the run owns, is ever replaced."""
    from dist_train.data.build import build_shards, expand_inputs

    out = built_dir(output_dir, s.name)
    _, files = expand_inputs(s.path)
    stamp = {"inputs": [[f, Path(f).stat().st_size, Path(f).stat().st_mtime] for f in files],
             "tokenizer": tokenizer_name, "seq_len": seq_len, "text_field": s.text_field}
    marker = out.parent / f"{s.name}.{SOURCE_FILE}"  # what it was packed from
    if marker.is_file() and json.loads(marker.read_text()) == stamp and (out / "manifest.json").is_file():
        return read_manifest(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # build_shards replaces only its own earlier packing; a directory of anything else is a DataError.
    man = build_shards(input_spec=s.path, output=out, tokenizer_name=tokenizer_name, seq_len=seq_len,
                       text_field=s.text_field, samples_per_shard=1000, val_fraction=0.0, progress=progress,
                       overwrite=True)
    marker.write_text(json.dumps(stamp))
    return man


def held_out(man: Manifest) -> list[ShardInfo]:
    """The shards a set is evaluated on: its validation split, or its training split when it has none
    (a set named in pretrain.eval.sets; a corpus the run trains on is never evaluated on what it trains on:
    `usable`)."""
    return man.validation or man.train


def usable(s: EvalSource, man: Manifest) -> bool:
    """False for a corpus the run trains on that has no validation split: it is not evaluated."""
    return not s.default or bool(man.validation)


def set_size(man: Manifest, limit: int) -> int:
    total = sum(s.samples for s in held_out(man))
    return min(total, limit) if limit else total


def read_samples(man: Manifest, wanted: set[int], size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(index, sample) for the wanted indices below `size`, in index order; shards past the last
    wanted index are never opened."""
    from dist_train.data.stream import read_shard

    last = max(wanted, default=-1)
    start = 0
    for shard in held_out(man):
        if start > last or start >= size:
            return
        if any(start <= i < start + shard.samples for i in wanted):
            rows = read_shard(man.path(shard), samples=shard.samples, seq_len=man.seq_len, sha256=shard.sha256)
            for k, row in enumerate(rows):
                if start + k in wanted and start + k < size:
                    yield start + k, row
        start += shard.samples


def check_fits(name: str, man: Manifest, main: Manifest) -> None:
    """A set must be tokenized like the training data, or its loss means nothing."""
    if man.seq_len != main.seq_len or man.tokenizer.get("sha256") != main.tokenizer.get("sha256"):
        raise DataError(f"evaluation set {name!r} was built with another tokenizer or seq_len than "
                        f"pretrain.data.shards: rebuild it with the main tokenizer and --seq-len {main.seq_len}")
    if not held_out(man) or sum(s.samples for s in held_out(man)) == 0:
        raise DataError(f"evaluation set {name!r} holds no samples: give it more text or a lower seq_len")
