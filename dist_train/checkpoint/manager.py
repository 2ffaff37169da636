"""Checkpoint commit protocol, resume lookup and retention for one stage's checkpoint directory.

Layout: `<stage>/checkpoints/step_00000050/` (DeepSpeed files + meta.json) and `latest`
(the committed tag). A save is written into `.staging/<tag>`, fsynced, renamed into place by
rank 0, and only then does `latest` move (write-temp, fsync, rename). A crash at any point
leaves the previous committed checkpoint as `latest`; a directory without meta.json is never
picked. Resume (this run's own state) and init_from (weights only, from elsewhere) are separate:
this module only does the former.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dist_train import owned
from dist_train.data.ledger import Ledger, gather
from dist_train.faults import Faults
from dist_train.outputs import fsync_dir, write_atomic
from dist_train.world import World

META = "meta.json"
META_SUM = "meta.json.sha256"  # meta.json's own checksum (it holds everyone else's)
META_FORMAT = 2  # 2: meta.json.sha256 exists and must match
RNG_DIR = "rng"  # one rng/rank_NNNNN.npy per rank: DeepSpeed keeps client state of rank 0 only
LATEST = "latest"
BEST = "best"  # the committed checkpoint with the best evaluation metric
STAGING = ".staging"
UNIVERSAL = ".universal"  # checkpoints converted for another worker count


CHECKPOINT_KIND = "checkpoint"
CONVERTED_KIND = "converted checkpoint"


def _committed(path: Path) -> bool:
    """A checkpoint of a version before ownership markers: a step_* directory with meta.json (naming this tag,
    or damaged) in a checkpoints directory the manager keeps (it has `latest` or the staging directory)."""
    if not (path.name.startswith("step_") and (path / META).is_file()):
        return False
    try:
        return json.loads((path / META).read_text()).get("tag") == path.name
    except (OSError, ValueError, AttributeError):
        return (path.parent / LATEST).is_file() or (path.parent / STAGING).is_dir()


def _in(parent_name: str) -> owned.Proof:
    """A directory of a version before ownership markers, known by the checkpoint subdirectory it is in."""
    return lambda path: path.parent.name == parent_name and path.parent.parent.is_dir()


def _drop(path: Path, kind: str, legacy: owned.Proof) -> None:
    """Delete an old checkpoint (best effort: one that cannot be deleted stays, and is deleted next time)."""
    with contextlib.suppress(OSError, owned.OwnershipError):
        owned.remove(path, kind, legacy=legacy)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message names the cause and the intact previous one."""


def describe_os_error(e: OSError) -> str:
    """'No space left on device (ENOSPC) at PATH': the words and the code people search for."""
    code = errno.errorcode.get(e.errno or 0, "")
    where = f" at {e.filename}" if e.filename else ""
    return f"{e.strerror or e}{f' ({code})' if code else ''}{where}"


def free_space_note(path: Path) -> str:
    """', 12.0 MiB free there': torch reports a full disk as an opaque write error, so say it."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return ""
    return f", {free / 2**20:.1f} MiB free there"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under root, so a rename after it publishes durable data."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def latest_committed(root: Path) -> str | None:
    """The tag `latest` names, if it points at a committed checkpoint (with meta.json)."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (root / tag / META).is_file() else None


def committed_tags(root: Path) -> list[str]:
    """Committed checkpoints (those with meta.json), newest first."""
    return sorted((p.name for p in root.glob("step_*") if (p / META).is_file()), reverse=True)


def checksums(ckpt_dir: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file of a checkpoint, keyed by relative path."""
    from dist_train.data.manifest import sha256_file

    return {str(p.relative_to(ckpt_dir)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(ckpt_dir.rglob("*")) if p.is_file() and p.name != META}


def verify_files(ckpt_dir: Path) -> str | None:
    """None when every file recorded in meta.json is present with its size and sha256; else what is wrong."""
    try:
        raw = (ckpt_dir / META).read_bytes()
        meta = json.loads(raw)
        files = meta["files"]
        covered = meta.get("format", 1) >= 2  # meta.json is covered too (older checkpoints had no sum)
        if covered and (ckpt_dir / META_SUM).read_text().strip() != hashlib.sha256(raw).hexdigest():
            return f"{META} does not match its recorded sha256 ({META_SUM})"
        if not isinstance(files, dict):
            return f"{META} has no file list"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{META} unreadable: {e.__class__.__name__}"
    from dist_train.data.manifest import sha256_file

    for rel, want in files.items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts or not isinstance(want, dict):
            return f"{META} lists {rel!r}, which is not a file of the checkpoint"
        path = ckpt_dir / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != want.get("size") or sha256_file(path) != want.get("sha256"):
            return f"{rel} does not match its recorded sha256"
    return None


def latest_meta(root: Path) -> tuple[str, dict[str, Any]] | None:
    """(tag, meta.json) of the checkpoint `latest` names in `root`, if it is committed."""
    tag = latest_committed(root) if root.is_dir() else None
    return None if tag is None else (tag, json.loads((root / tag / META).read_text()))


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict[str, str]:
    import torch
    import transformers

    from dist_train.deepspeed_import import import_deepspeed

    deepspeed = import_deepspeed()

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__}


def save_rng(ckpt_dir: Path, rank: int) -> None:
    """Store this rank's torch RNG states (CPU, and CUDA when present) as plain npy (no pickle)."""
    import numpy as np
    import torch

    (ckpt_dir / RNG_DIR).mkdir(exist_ok=True)
    np.save(ckpt_dir / RNG_DIR / f"rank_{rank:05d}.cpu.npy", torch.get_rng_state().numpy(), allow_pickle=False)
    if torch.cuda.is_available():
        np.save(ckpt_dir / RNG_DIR / f"rank_{rank:05d}.cuda.npy", torch.cuda.get_rng_state().numpy(),
                allow_pickle=False)


def restore_rng(ckpt_dir: Path, rank: int) -> bool:
    """Restore what save_rng stored for `rank`; False when the checkpoint has no state for it
    (written by fewer ranks), in which case the seeded initial state stays."""
    import numpy as np
    import torch

    cpu = ckpt_dir / RNG_DIR / f"rank_{rank:05d}.cpu.npy"
    if not cpu.is_file():
        return False
    torch.set_rng_state(torch.from_numpy(np.load(cpu, allow_pickle=False)))
    cuda = cpu.with_name(f"rank_{rank:05d}.cuda.npy")
    if torch.cuda.is_available() and cuda.is_file():
        torch.cuda.set_rng_state(torch.from_numpy(np.load(cuda, allow_pickle=False)))
    return True


def rank_checkpoints(metas: dict[str, dict[str, Any]], keep: int, metric: str | None,
                     higher: bool) -> tuple[set[str], str | None]:
    """Which committed checkpoints to keep: the `keep` newest plus the best by `metric` among those
    evaluated at their own step. Returns (kept tags, best tag or None). Pure, for retention."""
    tags = sorted(metas)
    best = None
    if metric is not None:
        scored = [(metas[t]["eval"][metric], t) for t in tags
                  if metric in (metas[t].get("eval") or {}) and metas[t]["eval"][metric] == metas[t]["eval"][metric]]
        if scored:  # ties go to the earlier checkpoint: it reached the value first
            best = (max(scored, key=lambda x: (x[0], -tags.index(x[1]))) if higher
                    else min(scored, key=lambda x: (x[0], tags.index(x[1]))))[1]
    kept = set(tags[-keep:]) | ({best} if best else set())
    return kept, best


def best_committed(root: Path) -> str | None:
    """The tag `best` names, if it points at a committed checkpoint."""
    pointer = root / BEST
    tag = pointer.read_text().strip() if pointer.is_file() else ""
    return tag if tag and (root / tag / META).is_file() else None


class CheckpointManager:
    """Saves and finds committed checkpoints of one stage. Every rank calls `save`."""

    def __init__(self, root: Path, world: World, keep: int, run_info: dict[str, Any],
                 ledger: Ledger | None = None, describe: Callable[[Path], None] | None = None,
                 best_metric: str | None = None, higher_is_better: bool = False, faults: Faults | None = None) -> None:
        self.root, self.world, self.keep, self.run_info, self.ledger = root, world, keep, run_info, ledger
        self.faults = faults
        self.best_metric, self.higher = best_metric, higher_is_better
        self.describe = describe  # rank 0 writes the model's HF config and tokenizer into each checkpoint
        self.latest: str | None = None  # the newest checkpoint this run committed or resumed from
        if world.is_main:
            root.mkdir(parents=True, exist_ok=True)
        world.barrier()

    def resume_tag(self) -> str | None:
        """The newest committed checkpoint whose files match their recorded checksums (a collective).

        A checkpoint that fails verification is skipped with a message naming the file, and the
        previous one is used: a damaged checkpoint is never loaded.
        """
        choice = None
        if self.world.is_main:
            for tag in committed_tags(self.root):
                problem = verify_files(self.root / tag)
                if problem is None:
                    choice = tag
                    break
                print(f"[checkpoint] {tag} is damaged ({problem}); trying the previous one", flush=True)
        self.latest = self.world.broadcast_object(choice)
        return self.latest

    def meta(self, tag: str) -> dict[str, Any]:
        return json.loads((self.root / tag / META).read_text())

    def load_source(self, tag: str) -> tuple[Path, bool]:
        """Where the engine should load `tag` from, and whether it is in universal format.

        A checkpoint written by another number of workers is converted once (by rank 0, cached
        beside it) into DeepSpeed's universal format, which any worker count can load.
        """
        if self.meta(tag)["world_size"] == self.world.world_size:
            return self.root, False
        out = self.root / UNIVERSAL
        done = out / tag / "converted.json"
        if self.world.is_main and not done.is_file():
            owned.remove(out / tag, CONVERTED_KIND, legacy=_in(UNIVERSAL))  # an interrupted conversion
            owned.claim(out / tag, CONVERTED_KIND)
            cmd = [sys.executable, "-m", "dist_train.checkpoint.safe_load", "--input_folder",
                   str(self.root / tag), "--output_folder", str(out / tag), "--num_extract_workers", "1",
                   "--num_merge_workers", "1"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"converting {self.root / tag} for {self.world.world_size} workers failed: "
                                   f"{tail[0]}")
            for name in (META, RNG_DIR):  # keep our own files next to DeepSpeed's
                src = self.root / tag / name
                if src.is_dir():
                    shutil.copytree(src, out / tag / name, dirs_exist_ok=True)
                else:
                    shutil.copy(src, out / tag / name)
            write_atomic(done, json.dumps({"from_world_size": self.meta(tag)["world_size"]}))
        self.world.barrier()
        return out, True

    def save(self, engine: Any, step: int, client_state: dict[str, Any],
             evaluation: dict[str, float] | None = None) -> str:
        """Write, verify and commit a checkpoint for `step`; returns its tag once committed.
        `evaluation`: the metrics of an evaluation at this very step (ranks it for `best`).

        Every rank returns or every rank raises `CheckpointWriteError`: a failed write on any rank
        (disk full, read-only, I/O error, vanished directory) stops training on all of them, the
        partial files are removed and the previous committed checkpoint stays `latest`.
        """
        tag = tag_for(step)
        staging = self.root / STAGING
        self._phase(tag, self.world.is_main, lambda: self._prepare(staging / tag, step))
        self._phase(tag, True, lambda: self._write_shards(engine, staging / tag, step, client_state))
        self._phase(tag, self.world.is_main, lambda: self._commit(staging / tag, step, evaluation))
        self.latest = tag
        return tag

    def _fault(self, phase: str, step: int) -> None:
        if self.faults is not None:
            self.faults.in_save(phase, step, self.root)

    def _phase(self, tag: str, act: bool, work: Callable[[], None]) -> None:
        """Run `work` where `act`, then agree over all ranks (a collective) that it succeeded."""
        problem = None
        if act:
            try:
                work()
            except Exception as e:
                problem = describe_os_error(e) if isinstance(e, OSError) else f"{e.__class__.__name__}: {e}"
                problem += free_space_note(self.root)
        problems = self.world.all_gather_object(problem)
        failed = [(rank, p) for rank, p in enumerate(problems) if p is not None]
        if not failed:
            return
        if self.world.is_main:
            owned.discard(self.root / STAGING / tag, CHECKPOINT_KIND)  # nothing half-written stays
        rank, problem = failed[0]
        previous = self.latest  # known without touching the (maybe vanished) directory
        raise CheckpointWriteError(
            f"checkpoint {tag} could not be written to {self.root} (rank {rank}: {problem}); training stopped "
            f"rather than continue unsaved. The previous checkpoint ({previous or 'none'}) is intact: fix the "
            "storage (free space, permissions, mount) and rerun the same command to resume from it")

    def _prepare(self, staging_tag: Path, step: int) -> None:
        self._fault("start", step)
        if not self.root.is_dir():
            raise FileNotFoundError(errno.ENOENT, "the checkpoint directory vanished (unmounted or deleted?)",
                                    str(self.root))
        staging_tag.parent.mkdir(exist_ok=True)  # never parents: a vanished share must not be recreated
        owned.remove(staging_tag, CHECKPOINT_KIND, legacy=_in(STAGING))  # leftovers of a crashed save
        owned.claim(staging_tag, CHECKPOINT_KIND)  # marked before the checksums are taken, so covered by them

    def _write_shards(self, engine: Any, staging_tag: Path, step: int, client_state: dict[str, Any]) -> None:
        engine.save(str(staging_tag.parent), staging_tag.name, client_state)
        save_rng(staging_tag, self.world.rank)
        if self.ledger is not None:
            self.ledger.flush(staging_tag)  # committed with the checkpoint, or not at all
        self._fault("engine_saved", step)

    def _commit(self, staging_tag: Path, step: int, evaluation: dict[str, float] | None) -> None:
        """Rank 0, once every rank's files are in staging: meta.json with checksums, rename, `latest`."""
        if self.describe is not None:
            self.describe(staging_tag)
        fsync_tree(staging_tag)
        tag = staging_tag.name
        meta = {"step": step, "tag": tag, "world_size": self.world.world_size, "time": time.time(),
                "git_revision": git_revision(), "versions": library_versions(), **self.run_info,
                "eval": evaluation or {}, "files": checksums(staging_tag), "format": META_FORMAT}
        text = json.dumps(meta, indent=1)
        (staging_tag / META).write_text(text)
        (staging_tag / META_SUM).write_text(hashlib.sha256(text.encode()).hexdigest() + "\n")
        fsync_tree(staging_tag)
        self._fault("staged", step)
        final = self.root / tag
        # The commit point: a step_* directory with meta.json (replacing one of the same step from an
        # earlier attempt).
        owned.replace(staging_tag, final, CHECKPOINT_KIND, legacy=_committed, what="the checkpoint")
        fsync_dir(self.root)
        self._fault("renamed", step)
        write_atomic(self.root / LATEST, tag + "\n")
        self._fault("committed", step)
        gather(final, self.root.parent)
        self._retain(tag)
        if self.faults is not None:
            self.faults.after_commit(step, final)

    def _retain(self, newest: str) -> None:
        metas = {t: self.meta(t) for t in committed_tags(self.root)}
        kept, best = rank_checkpoints(metas, self.keep, self.best_metric, self.higher)
        if best is not None:  # point at the survivor before anything is deleted
            write_atomic(self.root / BEST, best + "\n")
        for old in sorted(set(metas) - kept - {newest}):
            _drop(self.root / old, CHECKPOINT_KIND, _committed)
        for aside in self.root.glob(".step_*.old-*"):  # a replaced checkpoint a crash left beside its successor
            owned.discard(aside, CHECKPOINT_KIND)
        for converted in (self.root / UNIVERSAL).glob("step_*"):
            if not (self.root / converted.name).is_dir():
                _drop(converted, CONVERTED_KIND, _in(UNIVERSAL))
