"""The two phases of `data build`, each resumable.

Phase 1 (parallel): documents are cut into fixed chunks; each chunk is tokenized, every document
followed by the separator token, and cached as `tokens/chunk-NNNNNN.npz` (tokens, per-document
lengths, validation flags). Chunks are independent, so any number of processes gives the same
cache, and a finished chunk is never redone.

Phase 2 (sequential, no tokenizing): the cached tokens of each split are concatenated and cut
into full samples of seq_len, written `samples_per_shard` at a time into tar shards. After each
shard, `progress.json` records the shards and the exact token position that follows them, so an
interrupted build resumes after its last finished shard.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dist_train.data.manifest import TOKENS_KEY, ShardInfo, sha256_file

SPLITS = {"train": "shard", "validation": "val"}


def chunk_path(work: Path, chunk: int) -> Path:
    return work / "tokens" / f"chunk-{chunk:06d}.npz"


def val_flags(seed: int, chunk: int, n: int, val_fraction: float) -> np.ndarray:
    """Which documents of a chunk are held out: a function of (seed, chunk) only."""
    return np.random.default_rng([seed, chunk, 11]).random(n) < val_fraction


_ENCODE: Any = None  # this process's tokenizer: texts -> lists of token ids


def make_encoder(tokenizer: Any) -> tuple[str, str]:
    """A picklable recipe for the tokenizer, cheap to load in a worker process.

    Fast tokenizers travel as their Rust tokenizer's JSON (workers import only `tokenizers`,
    not torch); others by name, loaded with transformers in each worker.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return "json", backend.to_str()
    return "name", tokenizer.name_or_path


def init_encoder(recipe: tuple[str, str]) -> None:
    global _ENCODE
    kind, value = recipe
    if kind == "json":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(value)
        # A saved tokenizer.json may carry padding/truncation settings (sentence-transformers
        # models do): whole documents must be encoded as they are.
        tok.no_padding()
        tok.no_truncation()
        _ENCODE = lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]  # noqa: E731
    else:
        from dist_train.model.build import load_tokenizer

        slow = load_tokenizer(value)
        _ENCODE = lambda texts: slow(texts, add_special_tokens=False)["input_ids"]  # noqa: E731


PIECE_CHARS = 1 << 20  # a longer document is tokenized in pieces of about this many characters
# Where pre-tokenizers (byte-level BPE as in GPT-2 and Llama 3, WordPiece) split anyway, so that a cut
# changes no token: after a lone newline between two non-space characters ("foo.\nBar"); failing that,
# before a lone space between two non-space characters ("foo| bar": the space belongs to the next word).
# Never inside a run of whitespace, which these tokenizers may merge into one token.
_CUTS = (re.compile(r"(?<=\S)\n(?=\S)"), re.compile(r"(?<=\S)(?= \S)"))


def encode_documents(texts: list[str]) -> list[Any]:
    """The token ids of each document. A document longer than PIECE_CHARS is encoded piece by piece,
    cut where the tokenizer splits anyway (_CUTS) and joined without a separator, so a tokenizer's
    working memory (about 200 bytes per character for a fast tokenizer) is that of one piece, not of
    the document. Only a tokenizer that marks the start of its input (SentencePiece's leading "▁")
    can tokenize the start of a piece differently: at most one token per piece."""
    short = [t for t in texts if len(t) <= PIECE_CHARS]
    encoded = iter(_ENCODE(short) if short else [])  # a slow tokenizer fails on an empty batch
    return [next(encoded) if len(t) <= PIECE_CHARS else _encode_long(t) for t in texts]


def _cut(text: str, start: int, end: int) -> int:
    """Where to end the piece text[start:end]: the last safe cut in its second half, else `end`."""
    for pattern in _CUTS:
        cuts = [m.end() for m in pattern.finditer(text, start + PIECE_CHARS // 2, end)]
        if cuts:
            return cuts[-1]
    return end


def _encode_long(text: str) -> np.ndarray:
    pieces, start = [], 0
    while start < len(text):
        end = min(start + PIECE_CHARS, len(text))
        end = _cut(text, start, end) if end < len(text) else end
        pieces.append(np.asarray(_ENCODE([text[start:end]])[0], dtype=np.int32))
        start = end
    return np.concatenate(pieces)


def tokenize_chunk(args: tuple[Path, int, list[str], int, int, float]) -> int:
    """Tokenize one chunk of documents into its cache file; returns its token count."""
    work, chunk, texts, sep, seed, val_fraction = args
    ids = encode_documents(texts)
    lengths = np.array([len(x) + 1 for x in ids], dtype=np.int64)
    tokens = np.empty(int(lengths.sum()), dtype=np.int32)
    end = 0
    for x in ids:  # each document, then its separator
        tokens[end:end + len(x)] = x
        end += len(x) + 1
        tokens[end - 1] = sep
    out = chunk_path(work, chunk)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, tokens=tokens, lengths=lengths, val=val_flags(seed, chunk, len(ids), val_fraction))
    os.replace(tmp, out)
    return int(lengths.sum())


def samples(work: Path, chunks: int, split: str, seq_len: int, dtype: Any, start: tuple[int, int, int],
            prefix: int | None = None) -> Iterator[tuple[np.ndarray, tuple[int, int, int]]]:
    """Full samples of one split from the token cache, from token position `start` on.

    A position is (chunk, document, token offset). Each sample comes with the position of the
    first token after it. The tail shorter than seq_len is dropped: no padding is ever trained on.
    With `prefix` (an encoder's [CLS]) every sample starts with that token.
    """
    cur = np.empty(seq_len, dtype=dtype)
    if prefix is not None:
        cur[0] = prefix
    first = 0 if prefix is None else 1
    fill = first
    want_val = split == "validation"
    for c in range(start[0], chunks):
        z = np.load(chunk_path(work, c))
        tokens, lengths, val = z["tokens"], z["lengths"], z["val"]
        ends = np.cumsum(lengths)
        for d in range(start[1] if c == start[0] else 0, len(lengths)):
            if bool(val[d]) != want_val:
                continue
            doc = tokens[ends[d] - lengths[d]:ends[d]]
            o = start[2] if (c, d) == start[:2] else 0
            while o < len(doc):
                take = min(seq_len - fill, len(doc) - o)
                cur[fill:fill + take] = doc[o:o + take]
                fill, o = fill + take, o + take
                if fill == seq_len:
                    yield cur.copy(), (c, d, o)
                    fill = first


def doc_length_histogram(work: Path, chunks: int) -> dict[str, int]:
    """Documents per token-length bucket (powers of two), for `data inspect`."""
    hist: dict[str, int] = {}
    for c in range(chunks):
        for n in np.load(chunk_path(work, c))["lengths"]:
            hi = 1 << max(int(n) - 1, 0).bit_length()
            key = f"{hi // 2 + 1}-{hi}" if hi > 1 else "1"
            hist[key] = hist.get(key, 0) + 1
    return dict(sorted(hist.items(), key=lambda kv: int(kv[0].split("-")[-1])))


class ShardWriter:
    """Writes one WebDataset tar shard of `<key>.tokens.npy` members, fast and byte-reproducible.

    Every sample has the same dtype and length, so the npy header is encoded once; members are
    plain USTAR entries with a fixed owner, mode and mtime (webdataset reads them as usual).
    """

    def __init__(self, path: Path, seq_len: int, dtype: Any) -> None:
        import tarfile

        template = io.BytesIO()
        np.save(template, np.zeros(seq_len, dtype=dtype), allow_pickle=False)
        self.header = template.getvalue()[: -seq_len * np.dtype(dtype).itemsize]
        self.tar = tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def add(self, sample: np.ndarray) -> None:
        import tarfile

        data = self.header + sample.tobytes()
        info = tarfile.TarInfo(f"{self.count:07d}.{TOKENS_KEY}")
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "bigdata", "bigdata"
        self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        self.tar.close()


def write_split(work: Path, chunks: int, split: str, seq_len: int, dtype: Any, per_shard: int,
                progress: dict[str, Any], save_progress, prefix: int | None = None,
                on_shard=lambda: None) -> list[ShardInfo]:
    """Phase 2 for one split, resuming after the shards `progress[split]` records. `on_shard` is
    called after each shard is written (for a progress display)."""
    state = progress.setdefault(split, {"shards": [], "pos": [0, 0, 0]})
    shards = [ShardInfo(**s) for s in state["shards"]]
    stream = samples(work, chunks, split, seq_len, dtype, tuple(state["pos"]), prefix)
    while True:
        name = f"{SPLITS[split]}-{len(shards):06d}.tar"
        count, pos = 0, None
        writer = ShardWriter(work / name, seq_len, dtype)
        for sample, after in stream:
            writer.add(sample.astype(dtype, copy=False))
            count, pos = count + 1, after
            if count == per_shard:
                break
        writer.close()
        if count == 0:
            (work / name).unlink()
            return shards
        shards.append(ShardInfo(name, count, count * seq_len, sha256_file(work / name)))
        state["shards"] = [s.__dict__ for s in shards]
        state["pos"] = list(pos)
        save_progress()
        on_shard()
        if count < per_shard:
            return shards


def load_progress(work: Path) -> dict[str, Any]:
    path = work / "progress.json"
    return json.loads(path.read_text()) if path.is_file() else {}
