"""Shards from a local directory, over HTTP (a server on 127.0.0.1), by brace pattern, or by pipe:."""

import functools
import http.server
import threading
from itertools import islice

import numpy as np
import pytest

from dist_train.data.manifest import DataError, read_manifest
from dist_train.data.mixture import Mixture
from dist_train.data.plan import PlanSpec
from dist_train.data.stream import pretrain_batches


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_root(shards_dir):
    handler = functools.partial(QuietHandler, directory=str(shards_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def first_steps(man, n=12):
    spec = PlanSpec(tuple(s.samples for s in man.train), lanes=2, global_batch=8, seed=0)
    it = pretrain_batches([man], Mixture.of(spec), world_size=2, rank=1, start_step=0)
    return [(rows, ids) for rows, ids, _ in islice(it, n)]


def assert_same(a, b):
    for (ra, ia), (rb, ib) in zip(a, b, strict=True):
        np.testing.assert_array_equal(ra, rb)
        assert ia == ib


def test_http_shards_stream_like_local_ones(shards_dir, http_root):
    remote = read_manifest(http_root)
    assert remote.root == http_root and remote.path(remote.train[0]).startswith("http://127.0.0.1:")
    assert_same(first_steps(remote), first_steps(read_manifest(shards_dir)))


def test_brace_pattern_selects_shards(shards_dir, http_root):
    man = read_manifest(f"{shards_dir}/shard-{{000001..000003}}.tar")
    assert [s.file for s in man.train] == ["shard-000001.tar", "shard-000002.tar", "shard-000003.tar"]
    assert len(read_manifest(f"{http_root}/shard-{{000000..000001}}.tar").train) == 2
    with pytest.raises(DataError, match=r"shard-000998\.tar is not a training shard .* \(2 unknown\)"):
        read_manifest(f"{shards_dir}/shard-{{000998..000999}}.tar")


def test_pipe_sources_need_opting_in(shards_dir):
    source = f"pipe:cat {shards_dir}/{{file}}"
    with pytest.raises(DataError, match="allow_pipe=true"):
        read_manifest(source)
    assert_same(first_steps(read_manifest(source, allow_pipe=True), 4), first_steps(read_manifest(shards_dir), 4))


def test_missing_remote_manifest_is_named(http_root):
    with pytest.raises(DataError, match="not found"):
        read_manifest(f"{http_root}/nothing-here")
