"""One run per output_dir: an exclusive lock the driver holds from before Ray starts until it exits.

The lock is an flock on OUTPUT_DIR/run.lock (on NFS, Linux maps it to a byte-range lock the server
knows), and the file names its holder (host, pid, start time). The kernel, or the NFS lock manager,
releases it when the holder dies however it dies (SIGKILL; a lost node once its lease runs out), so a
stale lock never needs breaking by hand: a lock file whose lock is free is taken over, and a holder
that did not release it is named in the log. A second run on the same output_dir (from any process,
this one included) refuses in one line that names the holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from dist_train.config.loader import ConfigError
from dist_train.outputs import LOCK


class RunLocked(ConfigError):
    """Another run holds the output_dir."""


def holder_of(out: Path) -> dict | None:
    """Who last held (or holds) the lock of `out`, from its file; None if unknown."""
    try:
        data = json.loads((Path(out) / LOCK).read_text() or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe(holder: dict | None) -> str:
    if not holder:
        return "another process"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} (started {when})"


@contextlib.contextmanager
def hold(out: Path, log=print) -> Iterator[None]:
    """Hold the lock of output_dir `out` (created if missing) for the block; raise RunLocked if another
    run holds it. A directory this call created and that holds nothing else afterwards is removed."""
    out = Path(out)
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"output_dir {str(out)!r}: {str(parent)!r} is a file, not a directory: choose another "
                              "output_dir")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"output_dir {str(out)!r} cannot be used ({e.strerror or e}): choose another output_dir, "
                          "or fix its permissions") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunLocked(f"output_dir {str(out)!r} is in use by another run ({describe(holder_of(out))}): wait for "
                            "it to finish or stop it, or choose another output_dir") from None
        before = holder_of(out)
        if before and before.get("pid") and not before.get("released"):
            log(f"note: the previous run on this output_dir ({describe(before)}) ended without releasing its lock; "
                "taking it over")
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({**me, "released": time.time()}).encode(), 0)
    finally:
        os.close(fd)  # closing releases the lock
        if created and [p.name for p in out.iterdir()] == [LOCK]:
            with contextlib.suppress(OSError):
                (out / LOCK).unlink()
                out.rmdir()
