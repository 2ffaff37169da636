"""Failures injected on purpose, so the test suite can prove recovery from the ugly cases.

Driven by the `faults` config section, off by default and refused unless the environment says
DIST_TRAIN_ALLOW_FAULTS=1 (see config/checks.py). Each fault fires once per run: a marker file
under OUTPUT_DIR/_faults/ is made durable *before* the fault acts, so the restarted worker group
does not fire it again and the run can finish.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

from dist_train.config.schema import FaultsConfig

ALLOW_ENV = "DIST_TRAIN_ALLOW_FAULTS"
MARKERS = "_faults"


def allowed() -> bool:
    return os.environ.get(ALLOW_ENV) == "1"


class Faults:
    """The fault points of one stage on one rank. Every method is a no-op unless configured."""

    def __init__(self, cfg: FaultsConfig, output_dir: Path, stage: str, rank: int) -> None:
        self.cfg, self.stage, self.rank = cfg, stage, rank
        self.markers = output_dir / MARKERS

    def _once(self, name: str) -> bool:
        """True the first time `name` is asked for in this run (across restarts)."""
        marker = self.markers / f"{self.stage}-{name}"
        try:
            self.markers.mkdir(parents=True, exist_ok=True)
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.fsync(fd)
        os.close(fd)
        fd = os.open(self.markers, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        return True

    def after_step(self, step: int) -> None:
        """SIGKILL or SIGSTOP this process after optimizer step `step`, if configured for it."""
        if self.rank != self.cfg.rank:
            return
        if step in self.cfg.kill_at_steps and self._once(f"kill-{step}"):
            print(f"[faults] rank {self.rank}: SIGKILL after step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.cfg.stop_at_step and self._once(f"stop-{step}"):
            print(f"[faults] rank {self.rank}: SIGSTOP after step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)

    def in_save(self, phase: str, step: int, checkpoints: Path) -> None:
        """Act at `phase` of the save of `step`: kill, raise an OS error, or make the directory vanish."""
        for f in self.cfg.save:
            if (f.step, f.phase, f.rank) != (step, phase, self.rank) or not self._once(f"save-{step}-{phase}"):
                continue
            print(f"[faults] rank {self.rank}: {f.action} in the save of step {step} at {phase}", flush=True)
            if f.action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if f.action == "vanish":  # an unmounted share: the files are elsewhere, the path is gone
                checkpoints.rename(checkpoints.with_name(checkpoints.name + ".unmounted"))
                return
            code = getattr(errno, f.action)
            raise OSError(code, os.strerror(code), str(checkpoints))

    def after_commit(self, step: int, ckpt_dir: Path) -> None:
        """Flip one byte in the middle of the largest file of a just-committed checkpoint."""
        if step != self.cfg.corrupt_checkpoint or not self._once(f"corrupt-{step}"):
            return
        victim = max((p for p in ckpt_dir.rglob("*.pt")), key=lambda p: p.stat().st_size)
        with open(victim, "r+b") as fh:
            fh.seek(victim.stat().st_size // 2)
            byte = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([byte[0] ^ 0x01]))
        print(f"[faults] flipped one byte of {victim}", flush=True)

