"""Crash-safe checkpoints with real DeepSpeed ZeRO-2 on 2 gloo processes.

A kill sweep across the save path (SIGKILL of rank 0 or rank 1 at every phase of a save), and
storage failures (disk full, read-only, I/O error, a vanished directory) during a save. After each,
a fresh pair of processes picks the checkpoint a restarted run would pick and loads it: it is
always a complete one, holding exactly the weights it was saved with.
"""

import json

import pytest
import torch.multiprocessing as mp

from tests.dist import workers
from tests.dist.spawn import spawn
from tests.dist.test_engine import free_port, tiny_config

# (phase, rank, action) -> the checkpoint a resume must pick
KILLS = [("start", 0, "kill", 2), ("engine_saved", 0, "kill", 2), ("engine_saved", 1, "kill", 2),
         ("staged", 0, "kill", 2), ("renamed", 0, "kill", 4), ("committed", 0, "kill", 4)]
STORAGE = [("start", 0, "EROFS", 2), ("engine_saved", 1, "ENOSPC", 2), ("staged", 0, "EIO", 2),
           ("start", 0, "vanish", 2)]


def _run_case(root, shards_dir, tokenizer_dir, phase, rank, action):
    case = root / f"{phase}-{rank}-{action}"
    fault = f"faults.save=[{{step: 4, phase: {phase}, rank: {rank}, action: {action}}}]"
    cfg = tiny_config(case, shards_dir, tokenizer_dir, fault, "pretrain.deepspeed.precision=fp32")
    out = case / "save.json"
    try:
        spawn(workers.save_with_fault, (2, free_port(), cfg, str(out)), 2)
        killed = False
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:
        # the fault's SIGKILL; spawn then ends the other rank, unless that one saw its peer vanish
        # ("Connection closed by peer") and raised first
        assert action == "kill", e
        killed = True
    fired = (case / "_faults" / f"pretrain-save-4-{phase}").is_file()
    assert fired, "the fault must have fired"
    return case, cfg, killed


def test_kill_sweep_and_storage_failures_never_give_a_corrupt_resume(tmp_path, shards_dir, tokenizer_dir,
                                                                     monkeypatch):
    monkeypatch.setenv("DIST_TRAIN_ALLOW_FAULTS", "1")
    expected, cfg = {}, None
    for phase, rank, action, want in KILLS + STORAGE:
        case, cfg, killed = _run_case(tmp_path, shards_dir, tokenizer_dir, phase, rank, action)
        assert killed == (action == "kill")
        ckpts = case / "checkpoints"
        if action == "vanish":  # the directory went away mid-run and was not recreated
            assert not ckpts.exists()
            (case / "checkpoints.unmounted").rename(ckpts)  # the share comes back
        if action != "kill":  # every rank stopped with the same one-line explanation
            errors = {json.loads((case / f"save.rank{r}").read_text())["error"] for r in (0, 1)}
            assert len(errors) == 1, errors
            (error,) = errors
            assert "checkpoint step_00000004 could not be written" in error
            assert "previous checkpoint (step_00000002) is intact" in error
            assert {"EROFS": "EROFS", "ENOSPC": "No space left on device (ENOSPC)", "EIO": "(EIO)",
                    "vanish": "vanished"}[action] in error
            assert f"rank {rank}:" in error
            assert not (ckpts / ".staging" / "step_00000004").exists(), "nothing half-written is left"
            assert not (ckpts / "step_00000004").exists()
        assert (ckpts / "latest").read_text().strip() == ("step_00000004" if phase == "committed"
                                                          else "step_00000002")
        expected[str(case)] = want
    out = tmp_path / "resume.json"
    spawn(workers.resume_after_faults, (2, free_port(), cfg, str(out), list(expected)), 2)
    resumed = json.loads(out.read_text())
    for case, want in expected.items():
        digests = json.loads((tmp_path / case / "save.digests").read_text())
        got = resumed[case]
        assert (got["tag"], got["step"]) == (f"step_{want:08d}", want), case
        assert got["digest"] == digests[str(want)], f"{case}: the loaded weights are not those saved at {want}"


def test_faults_are_refused_unless_allowed(tmp_path, shards_dir, tokenizer_dir, monkeypatch):
    from dist_train.config.checks import check_run
    from dist_train.config.loader import ConfigError, from_dict

    monkeypatch.delenv("DIST_TRAIN_ALLOW_FAULTS", raising=False)
    cfg = from_dict(tiny_config(tmp_path, shards_dir, tokenizer_dir, "faults.kill_at_steps=[3]"))
    with pytest.raises(ConfigError, match="faults.* injects failures on purpose"):
        check_run(cfg, ["pretrain"])


def test_a_rank_stuck_outside_a_collective_times_the_collective_out(tmp_path):
    out = tmp_path / "timeout.json"
    spawn(workers.collective_timeout, (2, free_port(), str(out)), 2)
    res = json.loads(out.read_text())
    assert res["recognised"] and res["step"] == 4 and 2.5 < res["waited"] < 6
    assert res["behind"].startswith("rank 1: train at step 3 (pid "), res["behind"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 3 MiB filesystem (tmpfs): room for one checkpoint of the tiny model, not two."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()[:80]}): needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_really_full_disk_stops_every_rank_and_keeps_the_previous_checkpoint(tiny_disk, shards_dir, tokenizer_dir):
    cfg = tiny_config(tiny_disk, shards_dir, tokenizer_dir, "pretrain.deepspeed.precision=fp32")
    out = tiny_disk.parent / "save.json"
    spawn(workers.save_with_fault, (2, free_port(), cfg, str(out)), 2)
    errors = {json.loads(out.with_suffix(f".rank{r}").read_text())["error"] for r in (0, 1)}
    assert len(errors) == 1, errors
    (error,) = errors
    assert "checkpoint step_00000004 could not be written" in error and "(step_00000002) is intact" in error
    assert " MiB free there)" in error  # torch words a full disk as an opaque write error
    ckpts = tiny_disk / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    assert not (ckpts / "step_00000004").exists() and not (ckpts / ".staging" / "step_00000004").exists()
    from dist_train.checkpoint.manager import verify_files

    assert verify_files(ckpts / "step_00000002") is None
