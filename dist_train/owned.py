"""The one place that deletes or replaces a directory.

dist-train removes or replaces only a directory it created and can prove it created: every
directory it makes for an output (an export, shards, the quickstart data, report plots, a
checkpoint, a temporary directory) gets a marker file, OWNER, naming its kind at creation.
Replacing an output is allowed only over an earlier output of the same kind (or an empty
directory, or nothing); an output inside one of the command's inputs, or holding one, is refused.
A refusal is an OwnershipError with one line that says what to do; nothing is removed.

No other module calls shutil.rmtree or os.replace on a directory (tests/unit/test_owned.py greps).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

OWNER = ".dist-train-owner"  # {"kind": ..., "id": ..., "created": ...}; in each directory dist-train made

Proof = Callable[[Path], bool]  # an older version's output of this kind, recognised by its layout


class OwnershipError(ValueError):
    """An output path that dist-train may not use: it holds something dist-train did not make."""


def claim(path: Path, kind: str) -> Path:
    """Create `path` (it must not exist, or be an empty directory) and mark it as dist-train's `kind`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if any(p.name != OWNER for p in path.iterdir()):
        raise OwnershipError(f"{path} is not empty: dist-train only writes into directories it creates")
    mark(path, kind)
    return path


def mark(path: Path, kind: str) -> None:
    """Mark a directory dist-train has just filled (under a temporary name) as its `kind`."""
    stamp = {"kind": kind, "id": uuid.uuid4().hex, "created": time.time()}
    (Path(path) / OWNER).write_text(json.dumps(stamp) + "\n")


def kind_of(path: Path) -> str | None:
    """The kind a directory was marked with, or None (not a directory, no marker, or an unreadable one)."""
    try:
        kind = json.loads((Path(path) / OWNER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def owned(path: Path, kind: str, legacy: Proof | None = None) -> bool:
    """Whether `path` is a directory dist-train made as `kind` (or, with `legacy`, an older version's)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    return kind_of(path) == kind or (kind_of(path) is None and legacy is not None and legacy(path))


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output(dest: Path, kind: str, *, overwrite: bool = True, inputs: Iterable[Path] = (),
                 legacy: Proof | None = None, what: str = "the output") -> None:
    """Raise OwnershipError unless `dest` may become (or be replaced by) an output of `kind`.

    Allowed: no such path; an empty directory; with `overwrite`, an earlier output of the same kind.
    Refused: a file; a directory of anything else; `dest` inside an input or holding one.
    """
    dest = Path(dest).absolute()
    real = Path(os.path.realpath(dest))
    for src in inputs:
        src_real = Path(os.path.realpath(Path(src).absolute()))
        if _inside(real, src_real) or _inside(src_real, real):
            raise OwnershipError(f"{what} {str(dest)!r} and the input {str(src)!r} overlap (one holds the other): "
                                 "write the output somewhere else")
    if not os.path.lexists(dest) or _empty_dir(dest):
        return
    if not dest.is_dir() or dest.is_symlink():
        raise OwnershipError(f"{what} {str(dest)!r} exists and is not a directory: choose a new path")
    found = kind_of(dest)
    if not owned(dest, kind, legacy):
        made = f"a dist-train {found}, not a {kind}" if found else "not made by dist-train"
        raise OwnershipError(f"{what} {str(dest)!r} exists and is {made}: choose a new path, or move it away first "
                             "(dist-train replaces only its own outputs of the same kind)")
    if not overwrite:
        raise OwnershipError(f"{what} {str(dest)!r} already holds a {kind}: choose a new path, or pass --overwrite "
                             "to replace it")


def temp_beside(dest: Path, kind: str = "temporary") -> Path:
    """A fresh, marked temporary directory next to `dest` (same filesystem, so the final rename is atomic)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    return claim(tmp, kind)


def replace(tmp: Path, dest: Path, kind: str, *, legacy: Proof | None = None, what: str = "the output") -> Path:
    """Move the finished temporary directory `tmp` to `dest`, replacing an earlier output of the same kind
    (checked again here, just before). `dest` ends up marked as `kind`; `tmp` is gone."""
    tmp, dest = Path(tmp), Path(dest)
    if kind_of(tmp) is None:
        raise OwnershipError(f"{tmp} is not a directory dist-train made: refusing to move it")
    check_output(dest, kind, legacy=legacy, what=what)
    if kind_of(tmp) != kind:  # (a checkpoint is marked before its checksums are taken: left as it is)
        mark(tmp, kind)
    share(tmp)
    if os.path.lexists(dest):
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(dest, old)  # out of the way first: `dest` is never a mix of the two
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    return dest


def umask() -> int:
    """This process's umask, read without changing it (os.umask would, for a moment, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def share(root: Path) -> None:
    """Give every file under `root` the modes a plain write would (0666 and directories 0777, less the
    umask): some writers (transformers' safetensors saving, tempfile) create files 0600, which
    teammates on shared storage then cannot read."""
    import stat

    mask = umask()
    for path in [Path(root), *Path(root).rglob("*")]:
        with contextlib.suppress(OSError):
            mode = path.lstat().st_mode  # one stat per path; a checkpoint's files mostly need no change
            if stat.S_ISLNK(mode):
                continue
            want = (0o777 if stat.S_ISDIR(mode) else 0o666) & ~mask
            if stat.S_IMODE(mode) != want:
                path.chmod(want)


def remove(path: Path, kind: str, *, legacy: Proof | None = None) -> None:
    """Delete a directory dist-train made as `kind` (or an empty one). Nothing there: nothing to do.
    Anything else raises OwnershipError and stays untouched."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if _empty_dir(path):
        path.rmdir()
        return
    if not owned(path, kind, legacy):
        raise OwnershipError(f"{path} was not made by dist-train as a {kind}: refusing to delete it")
    shutil.rmtree(path)


def discard(path: Path, kind: str | None = None) -> None:
    """Best-effort cleanup after a failure of a directory dist-train made (of `kind`, or of any kind):
    never raises, never deletes a directory without dist-train's marker (an empty one aside)."""
    path = Path(path)
    try:
        found = kind_of(path)
        if found is not None and (kind is None or found == kind):
            shutil.rmtree(path, ignore_errors=True)
        elif _empty_dir(path):
            path.rmdir()
    except OSError:
        pass
