"""Where shards live: local directories, fsspec URLs (s3://, gs://, https://, ...) and, only when
a config opts in, `pipe:` commands. One function opens a shard or manifest for reading.

A source string names the directory that holds manifest.json, optionally with a brace pattern
selecting some of its shards: `https://host/corpus/shard-{000000..000099}.tar`.
A `pipe:` source is a shell command with `{file}` where the file name goes, e.g.
`pipe:aws s3 cp s3://bucket/corpus/{file} -`; it runs commands, so it is refused unless
`pretrain.data.allow_pipe` is true.
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
from collections.abc import Iterator
from typing import IO

from dist_train.data.manifest import DataError

PIPE = "pipe:"


def is_url(source: str) -> bool:
    return "://" in source or source.startswith(PIPE)


def split_pattern(source: str) -> tuple[str, str | None]:
    """(directory or URL prefix, brace pattern of shard names or None)."""
    if source.startswith(PIPE):
        return source, None
    head, _, tail = source.rstrip("/").rpartition("/")
    if "{" in tail and tail.endswith(".tar"):
        return head, tail
    return source.rstrip("/"), None


def expand_pattern(pattern: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def join(root: str, file: str) -> str:
    if root.startswith(PIPE):
        if "{file}" not in root:
            raise DataError(f"pipe source {root!r} has no {{file}} placeholder: write e.g. "
                            "'pipe:aws s3 cp s3://bucket/corpus/{file} -'")
        return root.replace("{file}", file)
    return f"{root}/{file}"


def check_allowed(source: str, allow_pipe: bool) -> None:
    if source.startswith(PIPE) and not allow_pipe:
        raise DataError(f"pretrain.data.shards {source!r} is a pipe: command, which runs a shell command for every "
                        "shard: set pretrain.data.allow_pipe=true to allow it")


@contextlib.contextmanager
def open_binary(url: str) -> Iterator[IO[bytes]]:
    """Open a local path, fsspec URL or pipe: command for sequential binary reading."""
    if url.startswith(PIPE):
        proc = subprocess.Popen(shlex.split(url[len(PIPE):]), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            yield proc.stdout
        finally:
            proc.stdout.close()
            err = proc.stderr.read().decode(errors="replace").strip()
            if proc.wait() != 0:
                raise DataError(f"{url!r} exited with status {proc.returncode}: {err.splitlines()[-1] if err else ''}")
        return
    import fsspec

    try:
        with fsspec.open(url, "rb") as f:
            yield f
    except FileNotFoundError:
        raise DataError(f"{url} not found: check pretrain.data.shards and that the file exists") from None
