"""Corrupt shards: policy `error` names shard and member; policy `skip` keeps every step full."""

import io
import json
import shutil
import time
from itertools import islice

import numpy as np
import pytest

from dist_train.data.manifest import DataError, read_manifest, sha256_file
from dist_train.data.mixture import Mixture
from dist_train.data.plan import PlanSpec, epoch_lanes
from dist_train.data.stream import load_shard, pretrain_batches


@pytest.fixture
def shards(tmp_path, shards_dir):
    copy = tmp_path / "shards"
    shutil.copytree(shards_dir, copy)
    return copy


def spec_of(man):
    return PlanSpec(tuple(s.samples for s in man.train), lanes=2, global_batch=8, seed=0)


def first_shard_of_rank(man, rank):
    return man.train[epoch_lanes(spec_of(man), 0)[rank][0]]


def rewrite_manifest(root, file, **fields):
    path = root / "manifest.json"
    raw = json.loads(path.read_text())
    for s in raw["train"]:
        if s["file"] == file:
            s.update(fields)
    path.write_text(json.dumps(raw))


def batches(man, rank, on_bad, n=6, verify=True):
    it = pretrain_batches([man], Mixture.of(spec_of(man)), world_size=2, rank=rank, start_step=0, on_bad=on_bad,
                          verify=verify)
    return list(islice(it, n))


def test_truncated_shard(shards):
    man = read_manifest(shards)
    bad = first_shard_of_rank(man, 1)
    data = (shards / bad.file).read_bytes()
    (shards / bad.file).write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(DataError, match=rf"{bad.file}: (unreadable after \d+ samples|\d+ of \d+ samples missing)"):
        batches(man, 1, "error")
    got = batches(man, 1, "skip")
    assert all(rows.shape == (4, 32) for rows, _, _ in got)
    assert sum(r for _, _, r in got) > 0
    batches(man, 0, "error")  # the other rank's shards are fine


def test_changed_bytes_fail_the_checksum(shards):
    man = read_manifest(shards)
    bad = first_shard_of_rank(man, 0)
    data = bytearray((shards / bad.file).read_bytes())
    data[2000] ^= 0xFF  # inside the first member's token payload
    (shards / bad.file).write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"sha256 .* does not match the manifest"):
        batches(man, 0, "error")
    batches(man, 0, "error", verify=False)  # the tar itself is still well formed


def write_shard(path, arrays):
    import webdataset as wds

    with wds.TarWriter(str(path), mtime=0.0) as w:
        for i, payload in enumerate(arrays):
            w.write({"__key__": f"{i:07d}", "tokens.npy": payload})


def test_wrong_length_dtype_and_pickles_are_refused(shards):
    man = read_manifest(shards)
    bad = first_shard_of_rank(man, 1)
    good = np.arange(32, dtype=np.uint16)
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"evil": 1}] * 32, dtype=object), allow_pickle=True)
    arrays = [good] * bad.samples
    arrays[1] = np.arange(16, dtype=np.uint16)  # wrong length
    arrays[2] = np.linspace(0, 1, 32)  # floats
    arrays[3] = pickled.getvalue()  # an object array: would need pickle to load
    write_shard(shards / bad.file, arrays)
    rewrite_manifest(shards, bad.file, sha256=sha256_file(shards / bad.file))
    rows, problems = load_shard(str(shards / bad.file), samples=bad.samples, seq_len=32)
    assert [r is None for r in rows[:5]] == [False, True, True, True, False]
    assert any("uint16[16]" in p for p in problems) and any("float64[32]" in p for p in problems)
    assert any("does not decode" in p for p in problems)
    with pytest.raises(DataError, match=r"member 0000001 holds uint16\[16\]"):
        batches(read_manifest(shards), 1, "error")
    assert all(rows.shape == (4, 32) for rows, _, _ in batches(read_manifest(shards), 1, "skip"))


def test_member_sizes_and_counts_are_checked_before_reading(tmp_path):
    """A hostile tar cannot make a reader allocate what its headers claim, nor list members forever."""
    import tarfile

    def tar_of(path, members):
        """Headers and data blocks as tar writes them, without the end-of-archive blocks: a header may
        claim any size, the data may stop where it likes."""
        out = bytearray()
        for name, size, data in members:
            info = tarfile.TarInfo(name)
            info.size = size
            out += info.tobuf() + data + bytes(-len(data) % 512)
        path.write_bytes(bytes(out))

    good = io.BytesIO()
    np.save(good, np.arange(32, dtype=np.uint16))
    payload = good.getvalue()
    # one member really is 1 MiB; the last declares a terabyte, and the file ends right after its header
    claims = tmp_path / "claims.tar"
    tar_of(claims, [("0000000.tokens.npy", len(payload), payload), ("0000001.tokens.npy", 1 << 20, bytes(1 << 20)),
                    ("0000002.tokens.npy", len(payload), payload), ("0000003.tokens.npy", 1 << 40, b"")])
    rows, problems = load_shard(str(claims), samples=4, seq_len=32)
    assert [r is not None for r in rows] == [True, False, False, False]
    assert problems == [f"claims.tar: member 0000001.tokens.npy declares {1 << 20} bytes, more than a sample can "
                        f"take ({(1 << 16) + 8 * 32}); the rest of the shard is not read"]
    tar_of(claims, [("0000000.tokens.npy", len(payload), payload), ("0000003.tokens.npy", 1 << 40, b"")])
    t0 = time.monotonic()
    rows, problems = load_shard(str(claims), samples=4, seq_len=32)
    assert time.monotonic() - t0 < 5 and rows[0] is not None
    assert problems[0].startswith(f"claims.tar: member 0000003.tokens.npy declares {1 << 40} bytes")
    many = tmp_path / "many.tar"
    tar_of(many, [(f"{i:07d}.tokens.npy", len(payload), payload) for i in range(100)])
    rows, problems = load_shard(str(many), samples=4, seq_len=32)
    assert all(r is not None for r in rows) and "many.tar: more than 68 members for 4 samples" in problems
