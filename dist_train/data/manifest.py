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
    root: Path
    seq_len: int
    dtype: str
    tokenizer: dict[str, Any]
    train: list[ShardInfo]
    validation: list[ShardInfo]
    documents: int

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer["vocab_size"])

    def path(self, shard: ShardInfo) -> str:
        return str(self.root / shard.file)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "seq_len": self.seq_len, "dtype": self.dtype, "tokenizer": self.tokenizer,
            "documents": self.documents,
            "train": [s.__dict__ for s in self.train], "validation": [s.__dict__ for s in self.validation],
        }


def read_manifest(root: str | Path) -> Manifest:
    """Load and sanity-check a shard directory's manifest (cheap: no shard is opened)."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise DataError(f"shard directory {str(root)!r} does not exist: build it with "
                        "`dist-train data build --input ... --output {root}`")
    if not path.is_file():
        raise DataError(f"{str(root)!r} has no {MANIFEST}: it was not written by `dist-train data build` "
                        "(or the build did not finish); rebuild it")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise DataError(f"{path}: format {raw.get('format')!r} is not {FORMAT!r}: rebuild the shards "
                            "with this version of dist-train")
        man = Manifest(
            root=root, seq_len=int(raw["seq_len"]), dtype=str(raw["dtype"]), tokenizer=raw["tokenizer"],
            documents=int(raw["documents"]),
            train=[ShardInfo(**s) for s in raw["train"]],
            validation=[ShardInfo(**s) for s in raw["validation"]],
        )
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is damaged ({e.__class__.__name__}: {e}): rebuild the shards") from None
    if not man.train or sum(s.samples for s in man.train) == 0:
        raise DataError(f"{root} holds no training samples: the corpus was empty or shorter than one "
                        f"sample of {man.seq_len} tokens; add text or lower --seq-len")
    missing = [s.file for s in man.train + man.validation if not (root / s.file).is_file()]
    if missing:
        raise DataError(f"{root}: shard {missing[0]} listed in {MANIFEST} is missing "
                        f"({len(missing)} missing in all): copy it back or rebuild the shards")
    return man


def write_manifest(man: Manifest) -> None:
    (man.root / MANIFEST).write_text(json.dumps(man.to_json(), indent=1) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
