"""`dist-train data build`: raw text -> tokenized, packed WebDataset tar shards + manifest.json.

Guarantees: output is a pure function of (inputs, tokenizer, seq_len, samples_per_shard,
val_fraction, seed) — tar members carry a fixed mtime, so shard sha256s are reproducible.
Samples are numpy arrays (npy, never pickles). The output directory appears only when the
build is complete (written to a temp dir, then renamed), so a crash leaves nothing half-built.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dist_train.data.manifest import TOKENS_KEY, DataError, Manifest, ShardInfo, sha256_file, write_manifest

TEXT_SUFFIXES = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}


def expand_inputs(spec: str) -> tuple[str, list[str]]:
    """Resolve PATH_OR_GLOB to (reader kind, files) or ('saved', [dir]) for a saved HF dataset."""
    path = Path(spec)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()
                          or (path / "dataset_dict.json").exists()):
        return "saved", [str(path)]
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    else:
        files = sorted(glob.glob(spec, recursive=True))
    if not files:
        raise DataError(f"--input {spec!r} matches no file: give a .jsonl/.txt/.parquet file, a glob "
                        "such as 'corpus/*.jsonl', or a directory")
    kinds = {TEXT_SUFFIXES.get(Path(f).suffix) for f in files}
    if None in kinds:
        bad = next(f for f in files if Path(f).suffix not in TEXT_SUFFIXES)
        raise DataError(f"input {bad!r} has an unsupported suffix: use .jsonl, .json, .txt or .parquet")
    if len(kinds) > 1:
        raise DataError(f"--input {spec!r} mixes file kinds {sorted(kinds)}: build one kind at a time")
    empty = [f for f in files if os.path.getsize(f) == 0]
    if len(empty) == len(files):
        raise DataError(f"--input {spec!r}: every matched file is empty; point it at the corpus")
    return kinds.pop(), files


def read_documents(spec: str, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of PATH_OR_GLOB in a deterministic order, read through `datasets`."""
    import datasets

    datasets.disable_progress_bars()
    kind, files = expand_inputs(spec)
    if kind == "saved":
        ds = datasets.load_from_disk(files[0])
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    elif kind == "text":
        ds = datasets.load_dataset("text", data_files=files, split="train", sample_by="document")
    else:
        ds = datasets.load_dataset(kind, data_files=files, split="train")
    if text_field not in ds.column_names:
        raise DataError(f"{spec}: no field {text_field!r} (fields: {ds.column_names}); pass "
                        f"--text-field with the right name")
    for row in ds.select_columns([text_field]):
        text = row[text_field]
        if isinstance(text, str) and text.strip():
            yield text


def tokenizer_fingerprint(tokenizer: Any, name: str) -> dict[str, Any]:
    """Identity of a tokenizer: its name, vocab size, separator and a hash of its vocabulary."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha256(repr(vocab).encode()).hexdigest()
    return {"name_or_path": name, "sha256": digest, "vocab_size": len(tokenizer),
            "separator_id": separator_id(tokenizer)}


def separator_id(tokenizer: Any) -> int:
    """The token that ends a document in packed samples: EOS for decoders, SEP for encoders."""
    for tok in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if tok is not None:
            return int(tok)
    raise DataError("the tokenizer has neither an EOS nor a SEP token to separate documents: "
                    "use a tokenizer that defines one")


class Packer:
    """Concatenates documents (each followed by `sep`) and cuts the stream into seq_len samples.

    The tail shorter than seq_len stays buffered and is dropped at the end: every sample is
    full, so no padding is ever trained on.
    """

    def __init__(self, seq_len: int, sep: int, dtype: Any = np.int32) -> None:
        self.seq_len, self.sep, self.dtype = seq_len, sep, dtype
        self.buf: list[int] = []

    def feed(self, ids: list[int]) -> list[np.ndarray]:
        self.buf.extend(ids)
        self.buf.append(self.sep)
        out = []
        while len(self.buf) >= self.seq_len:
            out.append(np.asarray(self.buf[: self.seq_len], dtype=self.dtype))
            del self.buf[: self.seq_len]
        return out


def build_shards(*, input_spec: str, output: str | Path, tokenizer_name: str, seq_len: int,
                 text_field: str = "text", samples_per_shard: int = 1000, val_fraction: float = 0.05,
                 seed: int = 0, overwrite: bool = False, progress: bool = True,
                 tokenizer_label: str | None = None) -> Manifest:
    """Tokenize, pack and shard a corpus; returns the written manifest."""
    from tqdm import tqdm

    from dist_train.model.build import load_tokenizer

    output = Path(output)
    if seq_len < 8:
        raise DataError(f"--seq-len {seq_len} is too short: use at least 8")
    if samples_per_shard < 1:
        raise DataError(f"--samples-per-shard {samples_per_shard} must be >= 1")
    if not 0.0 <= val_fraction < 0.5:
        raise DataError(f"--val-fraction {val_fraction} must be in [0, 0.5)")
    if output.exists() and not output.is_dir():
        raise DataError(f"--output {str(output)!r} is a file: choose a directory path")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise DataError(f"--output {str(output)!r} is not empty: choose a new directory or pass --overwrite")
    expand_inputs(input_spec)  # fail on a bad path before loading the tokenizer
    tokenizer = load_tokenizer(tokenizer_name)
    sep = separator_id(tokenizer)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.int32

    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        rng = np.random.default_rng(seed)
        writers = {"train": _ShardWriter(tmp, "shard", samples_per_shard, dtype),
                   "validation": _ShardWriter(tmp, "val", samples_per_shard, dtype)}
        packers = {split: Packer(seq_len, sep, dtype) for split in writers}
        docs = 0
        bar = tqdm(desc="tokenizing", unit=" docs", disable=not progress)
        for batch in _batched(read_documents(input_spec, text_field), 256):
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                split = "validation" if rng.random() < val_fraction else "train"
                for sample in packers[split].feed(ids):
                    writers[split].add(sample)
            docs += len(batch)
            bar.update(len(batch))
        bar.close()
        if docs == 0:
            raise DataError(f"--input {input_spec!r} holds no non-empty documents in field {text_field!r}")
        train, val = writers["train"].close(), writers["validation"].close()
        if not train:
            raise DataError(f"the corpus ({docs} documents) is shorter than one training sample of "
                            f"{seq_len} tokens: add text or lower --seq-len")
        man = Manifest(root=str(output), seq_len=seq_len, dtype=np.dtype(dtype).name,
                       tokenizer=tokenizer_fingerprint(tokenizer, tokenizer_label or tokenizer_name),
                       train=train, validation=val, documents=docs)
        write_manifest(Manifest(**{**man.__dict__, "root": str(tmp)}))
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
        return man
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class _ShardWriter:
    """Writes samples into fixed-size tar shards `<prefix>-000000.tar`, recording ShardInfo."""

    def __init__(self, root: Path, prefix: str, per_shard: int, dtype: Any) -> None:
        self.root, self.prefix, self.per_shard, self.dtype = root, prefix, per_shard, dtype
        self.shards: list[ShardInfo] = []
        self.writer: Any = None
        self.count = 0
        self.tokens = 0

    def add(self, sample: np.ndarray) -> None:
        import webdataset as wds

        if self.writer is None:
            self.name = f"{self.prefix}-{len(self.shards):06d}.tar"
            self.writer = wds.TarWriter(str(self.root / self.name), mtime=0.0)
        self.writer.write({"__key__": f"{self.count:07d}", TOKENS_KEY: sample})
        self.count += 1
        self.tokens += int(sample.size)
        if self.count == self.per_shard:
            self._finish()

    def _finish(self) -> None:
        self.writer.close()
        self.shards.append(ShardInfo(self.name, self.count, self.tokens,
                                     sha256_file(self.root / self.name)))
        self.writer, self.count, self.tokens = None, 0, 0

    def close(self) -> list[ShardInfo]:
        if self.writer is not None:
            self._finish()
        return self.shards


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
