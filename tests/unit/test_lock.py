"""One run per output_dir (dist_train/launch/lock.py): a second holder refuses naming the first; a holder
that died (SIGKILL) leaves a lock that the next run takes over, saying so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dist_train.config.loader import ConfigError
from dist_train.launch.lock import RunLocked, hold
from tests.conftest import REPO

HOLDER = "import sys, time; from pathlib import Path; from dist_train.launch.lock import hold\n" \
         "with hold(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)\n"


def test_a_second_holder_refuses_and_names_the_first(tmp_path):
    out = tmp_path / "run"
    with hold(out):
        with pytest.raises(RunLocked, match=rf"is in use by another run \(pid {os.getpid()} on "), hold(out):
            pass
        (out / "metrics.jsonl").write_text("")
    holder = json.loads((out / "run.lock").read_text())
    assert holder["pid"] == os.getpid() and holder["released"] >= holder["started"]
    notes: list[str] = []
    with hold(out, notes.append):
        pass
    assert notes == [], "a released lock is taken without a note"


def test_a_killed_holder_leaves_a_lock_the_next_run_takes_over(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=f"pid {proc.pid}"), hold(out):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    notes: list[str] = []
    with hold(out, notes.append):
        assert json.loads((out / "run.lock").read_text())["pid"] == os.getpid()
    assert len(notes) == 1 and f"pid {proc.pid}" in notes[0] and "taking it over" in notes[0]


def test_a_directory_it_created_for_nothing_is_removed(tmp_path):
    out = tmp_path / "a" / "run"
    with pytest.raises(ValueError, match="boom"), hold(out):
        raise ValueError("boom")  # e.g. a config check that fails once the lock is held
    assert not out.exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a directory"), hold(tmp_path / "file" / "run"):
        pass
    started = time.time()
    with hold(tmp_path / "kept"):
        (tmp_path / "kept" / "run.json").write_text("{}")  # the run wrote something: all of it stays
    assert json.loads((tmp_path / "kept" / "run.lock").read_text())["started"] >= started - 1
