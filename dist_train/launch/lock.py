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
import errno
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
    fd = _acquire(out, log)
    try:
        before = holder_of(out)
        if before and before.get("pid") and not before.get("released"):
            log(f"note: the previous run on this output_dir ({describe(before)}) ended without releasing its lock; "
                "taking it over")
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        _write(fd, me)
        try:
            yield
        finally:
            _write(fd, {**me, "released": time.time()})
            if created and sorted(p.name for p in out.iterdir()) == [LOCK]:
                with contextlib.suppress(OSError):  # unlinked while still locked: no one can lock this inode
                    (out / LOCK).unlink()
                    out.rmdir()
    finally:
        os.close(fd)  # closing releases the lock


def _acquire(out: Path, log) -> int:
    """An open descriptor of OUTPUT_DIR/run.lock, locked by this process; RunLocked when another holds it.
    Retried when the file was replaced between opening and locking (its holder removed it on leaving)."""
    for _ in range(5):
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"output_dir {str(out)!r} cannot be used ({e.strerror or e}): choose another "
                              "output_dir, or fix its permissions") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise RunLocked(f"output_dir {str(out)!r} is in use by another run ({describe(holder_of(out))}): "
                                "wait for it to finish or stop it, or choose another output_dir") from None
            # A filesystem without locks (NFS mounted nolock, some parallel filesystems): run, but say so.
            log(f"note: output_dir {out} cannot be locked ({e.strerror or e}): nothing stops a second run from "
                "sharing it")
            return fd
        try:
            same = os.fstat(fd).st_ino == os.stat(out / LOCK).st_ino
        except OSError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise RunLocked(f"output_dir {str(out)!r} keeps changing hands: another run is starting or ending there; "
                    "try again, or choose another output_dir")


def _write(fd: int, holder: dict) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    os.fsync(fd)
