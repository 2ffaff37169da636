"""`dist-train data build`: raw text -> tokenized, packed WebDataset tar shards + manifest.json.

Guarantees: output is a pure function of (inputs, tokenizer, seq_len, samples_per_shard,
val_fraction, seed, chunk_docs, and the CHUNK_CHARS and packing.PIECE_CHARS constants, recorded in
the build's fingerprint) whatever the number of worker processes — tar members carry a
fixed mtime, so shard sha256s are reproducible. Samples are numpy arrays (npy, never pickles).
The output directory appears only when the build is complete; an interrupted build resumes.
See data/packing.py for the two phases.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dist_train import owned
from dist_train.data.manifest import MANIFEST, DataError, Manifest, write_manifest
from dist_train.progress import Progress

SHARDS_KIND = "shard directory"
PARTIAL_KIND = "partial build"
TOKENS_KIND = "token cache"


def earlier_shards(path: Path) -> bool:
    """A shard directory written before ownership markers: its manifest and the shards it lists, nothing else."""
    try:
        man = json.loads((path / MANIFEST).read_text())
        listed = {MANIFEST} | {s["file"] for split in ("train", "validation") for s in man[split]}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(p.name in listed and p.is_file() for p in path.iterdir())


def _earlier_partial(path: Path) -> bool:
    """An interrupted build's work directory from before ownership markers: build.json, the token cache,
    progress and finished shards."""
    known = {"build.json", "tokens", "progress.json", ".progress.json.tmp", MANIFEST}
    return (path / "build.json").is_file() and all(p.name in known or p.suffix == ".tar" for p in path.iterdir())


def _in_partial(path: Path) -> bool:
    return owned.owned(path.parent, PARTIAL_KIND, _earlier_partial)


TEXT_SUFFIXES = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}


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
        raise DataError(f"input {bad!r} has an unsupported suffix: use .jsonl, .json, .txt, .csv or .parquet")
    if len(kinds) > 1:
        raise DataError(f"--input {spec!r} mixes file kinds {sorted(kinds)}: build one kind at a time")
    empty = [f for f in files if os.path.getsize(f) == 0]
    if len(empty) == len(files):
        raise DataError(f"--input {spec!r}: every matched file is empty; point it at the corpus")
    return kinds.pop(), files


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Silence the `datasets` library's own error log while it reads: a file it cannot parse becomes our
    one-line DataError, not a page of its tracebacks (some of which fail to format: "--- Logging error ---")."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


MAX_RECORD_MB = 64  # the largest single record (a line, or a whole .txt file) a reader accepts by default


def check_record_sizes(kind: str, files: list[str], what: str, max_mb: int = MAX_RECORD_MB) -> None:
    """Refuse a record larger than `max_mb` MiB before `datasets` reads it whole: one line of a JSON
    lines or CSV file, or a whole .txt file (one document) or .json array. Reads each file once in
    bounded pieces (a line is never held whole); Parquet and saved datasets are not checked here:
    their row groups bound what one read takes."""
    limit = max_mb << 20
    fix = "split it into smaller records (`dist-train data build --max-doc-mb` raises the bound)"
    for file in files:
        if "://" in file or kind not in ("json", "csv", "text"):
            continue
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            whole = kind == "text" or (kind == "json" and f.read(64).lstrip()[:1] == b"[")
            if whole:
                if size > limit:
                    raise DataError(f"{what}: {file} is one record of {size >> 20} MiB, more than the "
                                    f"{max_mb} MiB a reader takes at once: {fix}")
                continue
            f.seek(0)
            for number, line in enumerate(iter(lambda: f.readline(limit + 1), b""), 1):
                if len(line) > limit:
                    raise DataError(f"{what}: line {number} of {file} is longer than {max_mb} MiB, the most a "
                                    f"reader takes at once: {fix}")


def open_table(kind: str, files: list[str], what: str, max_mb: int | None = MAX_RECORD_MB) -> Any:
    """The rows of `files` (of reader `kind`, from expand_inputs) as one `datasets` table; DataError naming
    `what` when a file cannot be parsed (datasets raises many types: ArrowInvalid, UnicodeDecodeError, ...)
    or holds a record larger than `max_mb` MiB (check_record_sizes; None: the caller has checked)."""
    import datasets

    if max_mb is not None:
        check_record_sizes(kind, files, what, max_mb)
    datasets.disable_progress_bars()
    try:
        with quiet_datasets():
            if kind == "saved":
                ds = datasets.load_from_disk(files[0])
                return ds[("train" if "train" in ds else next(iter(ds)))] if isinstance(ds, datasets.DatasetDict) \
                    else ds
            if kind == "text":
                return datasets.load_dataset("text", data_files=files, split="train", sample_by="document")
            return datasets.load_dataset(kind, data_files=files, split="train")
    except Exception as e:
        cause = e.__cause__ or e.__context__ or e
        first = str(cause).splitlines()[0][:150] if str(cause) else ""
        raise DataError(f"{what} cannot be read ({type(cause).__name__}: {first}): check that it is valid {kind}, "
                        "UTF-8 encoded") from None


def read_documents(spec: str, text_field: str = "text", max_mb: int | None = MAX_RECORD_MB) -> Iterator[str]:
    """Yield the documents of PATH_OR_GLOB in a deterministic order, read through `datasets`; none is
    larger than `max_mb` MiB of text (None: the caller has run check_record_sizes)."""
    kind, files = expand_inputs(spec)
    ds = open_table(kind, files, f"--input {spec!r}", max_mb)
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
            "separator_id": separator_id(tokenizer), "sample_prefix_id": sample_prefix_id(tokenizer)}


def sample_prefix_id(tokenizer: Any) -> int | None:
    """Encoders (no EOS, a CLS) get [CLS] at the start of every packed sample, as in BERT."""
    return tokenizer.cls_token_id if tokenizer.eos_token_id is None else None


def separator_id(tokenizer: Any) -> int:
    """The token that ends a document in packed samples: EOS for decoders, SEP for encoders."""
    for tok in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if tok is not None:
            return int(tok)
    raise DataError("the tokenizer has neither an EOS nor a SEP token to separate documents: "
                    "use a tokenizer that defines one")


def build_shards(*, input_spec: str, output: str | Path, tokenizer_name: str, seq_len: int,
                 text_field: str = "text", samples_per_shard: int = 1000, val_fraction: float = 0.05,
                 seed: int = 0, overwrite: bool = False, progress: bool = True, workers: int = 1,
                 chunk_docs: int = 1024, tokenizer_label: str | None = None, max_doc_mb: int = MAX_RECORD_MB
                 ) -> Manifest:
    """Tokenize, pack and shard a corpus; returns the written manifest.

    Work happens in `.<output>.partial/` beside the output; an interrupted build started again
    with the same arguments resumes there (finished chunks and shards are kept). The output
    directory appears, complete, by one rename.
    """
    from dist_train.data import packing
    from dist_train.model.build import load_tokenizer

    output = Path(output)
    if seq_len < 8:
        raise DataError(f"--seq-len {seq_len} is too short: use at least 8")
    if samples_per_shard < 1 or workers < 1 or chunk_docs < 1 or max_doc_mb < 1:
        raise DataError("--samples-per-shard, --workers, --chunk-docs and --max-doc-mb must be >= 1")
    if not 0.0 <= val_fraction < 0.5:
        raise DataError(f"--val-fraction {val_fraction} must be in [0, 0.5)")
    kind, files = expand_inputs(input_spec)  # fail on a bad path or record before loading the tokenizer
    check_record_sizes(kind, files, f"--input {input_spec!r}", max_doc_mb)
    inputs = [Path(f) for f in files if "://" not in f]
    if Path(tokenizer_name).exists():  # a local tokenizer is an input too
        inputs.append(Path(tokenizer_name))
    work = output.parent / f".{output.name}.partial"
    try:
        owned.check_output(output, SHARDS_KIND, overwrite=overwrite, inputs=inputs, legacy=earlier_shards,
                           what="--output")
        owned.check_output(work, PARTIAL_KIND, inputs=inputs, legacy=_earlier_partial,
                           what="the build's work directory")
    except owned.OwnershipError as e:
        raise DataError(str(e)) from None
    tokenizer = load_tokenizer(tokenizer_name)
    sep = separator_id(tokenizer)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.int32
    fingerprint = {"inputs": [[f, os.path.getsize(f), os.path.getmtime(f)] for f in files],
                   "tokenizer": tokenizer_fingerprint(tokenizer, "")["sha256"], "seq_len": seq_len,
                   "samples_per_shard": samples_per_shard, "val_fraction": val_fraction, "seed": seed,
                   "text_field": text_field, "chunk_docs": chunk_docs, "chunk_chars": CHUNK_CHARS,
                   "piece_chars": packing.PIECE_CHARS}
    if (work / "build.json").is_file() and json.loads((work / "build.json").read_text()) != fingerprint:
        owned.remove(work, PARTIAL_KIND, legacy=_earlier_partial)  # an earlier build with other arguments
    resumed = (work / "build.json").is_file()
    if not resumed:
        owned.claim(work, PARTIAL_KIND)
    elif owned.kind_of(work) is None:  # an interrupted build of a version before markers (_earlier_partial)
        owned.mark(work, PARTIAL_KIND)
    if not (work / "tokens").is_dir():
        owned.claim(work / "tokens", TOKENS_KIND)
    (work / "build.json").write_text(json.dumps(fingerprint))
    try:
        # Phase 1: tokenize chunks (in parallel), skipping the ones cached by an interrupted build.
        docs, chunks = 0, 0
        bar = Progress("data build: tokenizing" + (" (resumed)" if resumed else ""), unit="docs", enabled=progress)
        jobs = ((work, c, texts, sep, seed, val_fraction)
                for c, texts in enumerate(_batched(read_documents(input_spec, text_field, None), chunk_docs)))
        for job in _map_ordered(jobs, packing.make_encoder(tokenizer), workers,
                                skip=lambda job: packing.chunk_path(work, job[1]).is_file()):
            docs += len(job[2])
            chunks += 1
            bar.update(len(job[2]))
        bar.close(f", {chunks} chunks")
        if docs == 0:
            raise DataError(f"--input {input_spec!r} holds no non-empty documents in field {text_field!r}")
        # Phase 2: pack each split into shards, resuming after the last finished shard.
        state = packing.load_progress(work)

        def save_progress() -> None:
            tmp = work / ".progress.json.tmp"
            tmp.write_text(json.dumps(state))
            os.replace(tmp, work / "progress.json")

        with Progress("data build: packing", unit="shards", enabled=progress) as bar:
            written = {split: packing.write_split(work, chunks, split, seq_len, dtype, samples_per_shard, state,
                                                  save_progress, sample_prefix_id(tokenizer), on_shard=bar.update)
                       for split in packing.SPLITS}
        if not written["train"]:
            raise DataError(f"the corpus ({docs} documents) is shorter than one training sample of "
                            f"{seq_len} tokens: add text or lower --seq-len")
        man = Manifest(root=str(output), seq_len=seq_len, dtype=np.dtype(dtype).name,
                       tokenizer=tokenizer_fingerprint(tokenizer, tokenizer_label or tokenizer_name),
                       train=written["train"], validation=written["validation"], documents=docs,
                       doc_tokens_histogram=packing.doc_length_histogram(work, chunks))
        for leftover in ("tokens", "progress.json", "build.json"):
            path = work / leftover
            owned.remove(path, TOKENS_KIND, legacy=_in_partial) if path.is_dir() else path.unlink()
        write_manifest(Manifest(**{**man.__dict__, "root": str(work)}))
        owned.replace(work, output, SHARDS_KIND, legacy=earlier_shards, what="--output")
        return man
    except DataError:
        owned.discard(work, PARTIAL_KIND)  # deterministic: a rerun would fail the same way
        raise


def _map_ordered(jobs: Iterator[tuple], encoder: tuple[str, str], workers: int, skip) -> Iterator[tuple]:
    """Run tokenize_chunk over jobs, `workers` processes at a time, yielding jobs in input order.

    At most 2 × workers chunks are in flight, so memory stays bounded on any corpus size.
    """
    from dist_train.data import packing

    if workers == 1:
        packing.init_encoder(encoder)
        for job in jobs:
            if not skip(job):
                packing.tokenize_chunk(job)
            yield job
        return
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=packing.init_encoder,
                                initargs=(encoder,)) as pool:
        pending: list[tuple[tuple, cf.Future | None]] = []
        for job in jobs:
            pending.append((job, None if skip(job) else pool.submit(packing.tokenize_chunk, job)))
            while len(pending) > 2 * workers:
                yield _finish(pending.pop(0))
        while pending:
            yield _finish(pending.pop(0))


def _finish(item: tuple[tuple, Any]) -> tuple:
    job, future = item
    if future is not None:
        future.result()  # re-raises a worker's error here
    return job


CHUNK_CHARS = 1 << 26  # a tokenizing task holds at most --chunk-docs documents and about this much text


def _batched(items: Iterable[str], n: int, chars: int = CHUNK_CHARS) -> Iterator[list[str]]:
    """Consecutive batches of `n` items, or fewer where they would hold more than `chars` characters."""
    batch: list[str] = []
    size = 0
    for item in items:
        batch.append(item)
        size += len(item)
        if len(batch) == n or size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
