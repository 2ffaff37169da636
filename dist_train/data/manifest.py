"""The shard manifest: what `data build` wrote and what training may rely on.

`manifest.json` lists every shard with its sample count and sha256, and records the tokenizer
and sequence length, so a mismatch is caught at validate time instead of mid-run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT = "dist_train.shards/1"
TOKENS_KEY = "tokens.npy"  # the one field of every sample: an int array of seq_len token ids


class DataError(ValueError):
    """Missing, empty or inconsistent data, named with the fix."""


@dataclass(frozen=True)
class ShardInfo:
    file: str
    samples: int
    tokens: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    root: str  # local directory, URL prefix or pipe: command (see data/sources.py)
    seq_len: int
    dtype: str
    tokenizer: dict[str, Any]
    train: list[ShardInfo]
    validation: list[ShardInfo]
    documents: int
    doc_tokens_histogram: dict[str, int] | None = None  # documents per token-length bucket
    sha256: str | None = None  # of manifest.json as read (not written into it): names the data in model cards

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer["vocab_size"])

    def path(self, shard: ShardInfo) -> str:
        from dist_train.data.sources import join

        return join(self.root, shard.file)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "seq_len": self.seq_len, "dtype": self.dtype, "tokenizer": self.tokenizer,
            "documents": self.documents, "doc_tokens_histogram": self.doc_tokens_histogram,
            "train": [s.__dict__ for s in self.train], "validation": [s.__dict__ for s in self.validation],
        }


def read_manifest(source: str | Path, *, allow_pipe: bool = False) -> Manifest:
    """Load and sanity-check a shard source's manifest (cheap: no shard is opened).

    `source` is a directory, an fsspec URL prefix or a pipe: command holding manifest.json,
    optionally ending in a brace pattern that selects some of its shards.
    """
    from dist_train.data.sources import check_allowed, expand_pattern, is_url, join, open_binary, split_pattern

    source = str(source)
    check_allowed(source, allow_pipe)
    root, pattern = split_pattern(source)
    remote = is_url(root)
    if not remote:
        if not Path(root).is_dir():
            raise DataError(f"shard directory {root!r} does not exist: build it with "
                            f"`dist-train data build --input ... --output {root}`")
        if not (Path(root) / MANIFEST).is_file():
            raise DataError(f"{root!r} has no {MANIFEST}: it was not written by `dist-train data build` "
                            "(or the build did not finish); rebuild it")
    path = join(root, MANIFEST)
    try:
        with open_binary(path) as f:
            text = f.read()
        raw = json.loads(text)
        if raw.get("format") != FORMAT:
            raise DataError(f"{path}: format {raw.get('format')!r} is not {FORMAT!r}: rebuild the shards "
                            "with this version of dist-train")
        man = Manifest(
            root=root, seq_len=int(raw["seq_len"]), dtype=str(raw["dtype"]), tokenizer=raw["tokenizer"],
            documents=int(raw["documents"]), doc_tokens_histogram=raw.get("doc_tokens_histogram"),
            train=[ShardInfo(**s) for s in raw["train"]],
            validation=[ShardInfo(**s) for s in raw["validation"]], sha256=hashlib.sha256(text).hexdigest(),
        )
        for shard in man.train + man.validation:
            _check_shard_info(shard)
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # JSONDecodeError, UnicodeDecodeError too
        raise DataError(f"{path} is damaged ({e.__class__.__name__}: {str(e)[:200]}): rebuild the shards") from None
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.__class__.__name__}: {e}): check the URL and credentials") from None
    if pattern is not None:
        wanted = expand_pattern(pattern)
        known = {s.file: s for s in man.train}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise DataError(f"{source}: {unknown[0]} is not a training shard of {path} ({len(unknown)} unknown): "
                            "fix the pattern")
        man = Manifest(**{**man.__dict__, "train": [known[w] for w in wanted]})
    if not man.train or sum(s.samples for s in man.train) == 0:
        raise DataError(f"{source} holds no training samples: the corpus was empty or shorter than one "
                        f"sample of {man.seq_len} tokens; add text or lower --seq-len")
    if not remote:
        missing = [s.file for s in man.train + man.validation if not (Path(root) / s.file).is_file()]
        if missing:
            raise DataError(f"{root}: shard {missing[0]} listed in {MANIFEST} is missing "
                            f"({len(missing)} missing in all): copy it back or rebuild the shards")
    return man


def _check_shard_info(shard: ShardInfo) -> None:
    """A manifest entry that could only come from data build: a plain file name, sane counts, a sha256."""
    name = shard.file
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"shard name {name!r} is not a file name in the shard directory")
    for key in ("samples", "tokens"):
        value = getattr(shard, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}: {key} {value!r} is not a count")
    if not isinstance(shard.sha256, str) or len(shard.sha256) != 64:
        raise ValueError(f"{name}: sha256 {shard.sha256!r} is not a sha256")


def write_manifest(man: Manifest) -> None:
    (Path(man.root) / MANIFEST).write_text(json.dumps(man.to_json(), indent=1) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
