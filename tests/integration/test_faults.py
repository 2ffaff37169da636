"""Survive anything, through real Ray Train and real DeepSpeed: SIGKILLs at random steps and mid-save, a frozen
rank, a damaged checkpoint and SIGTERM preemption all end in the weights of an uninterrupted run,
bit for bit, with every sample trained exactly once. Secrets in the environment leak nowhere.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.integration

STEPS = 20
BASE = [str(REPO / "configs" / "quickstart.yaml"), "finetune=null", f"pretrain.train.max_steps={STEPS}",
        "pretrain.train.save_every=4", "pretrain.train.log_every=2", "pretrain.train.eval_every=0"]
SECRETS = {"WANDB_API_KEY": "canary-wandb-5f1c", "HF_TOKEN": "hf_canary7d2e", "AWS_ACCESS_KEY_ID": "AKIACANARY9b3",
           "AWS_SECRET_ACCESS_KEY": "canary-aws-secret-0a8", "RAY_AUTH_TOKEN": "canary-ray-token-66e"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One directory for every run of this module: the quickstart data is prepared once."""
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def reference(workdir) -> bytes:
    """The exported weights of an uninterrupted run."""
    res = run_cli("run", *BASE, "output_dir=ref", cwd=workdir)
    assert res.returncode == 0, res.stderr[-3000:]
    return (workdir / "ref" / "pretrain" / "export" / "model.safetensors").read_bytes()


def fault_run(workdir: Path, name: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DIST_TRAIN_ALLOW_FAULTS": "1", **SECRETS}
    return subprocess.run([sys.executable, "-m", "dist_train.cli", "run", *BASE, f"output_dir={name}", *overrides],
                          capture_output=True, text=True, cwd=workdir, env=env, timeout=600)


def assert_exact(workdir: Path, name: str, reference: bytes) -> None:
    export = workdir / name / "pretrain" / "export" / "model.safetensors"
    assert export.read_bytes() == reference, "the recovered run must end with the uninterrupted run's weights"
    res = run_cli("ledger", "verify", str(workdir / name), cwd=workdir)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{STEPS} steps" in res.stdout and "duplicated 0, missing 0, off-plan steps 0" in res.stdout


def assert_no_secret(workdir: Path, name: str, *texts: str) -> None:
    """No canary in the run's output, in any file of its directory (checkpoints included), or in
    the logs of its Ray session."""
    files = [p for p in (workdir / name).rglob("*") if p.is_file()]
    # this run's own Ray sessions, as its console names them (tests run two at a time: session_latest may be another's)
    sessions = {Path(m) for t in texts for m in re.findall(r"its logs, Ray Train's included, in (/\S+/logs)\)", t)}
    assert sessions, "the run names its Ray session's logs"
    files += [p for s in sessions for p in s.rglob("*") if p.is_file()]
    for secret in SECRETS.values():
        assert all(secret not in t for t in texts), f"{secret} printed"
        leaked = [str(p) for p in files if secret.encode() in p.read_bytes()]
        assert not leaked, f"{secret} written to {leaked}"


def test_three_sigkills_at_random_steps_recover_bitwise_and_exactly_once(workdir, reference):
    seed = int(os.environ.get("DIST_TRAIN_FAULT_SEED", time.time_ns() % 10_000))
    # after the first commit (step 4; a kill at step 4 comes before its save): a kill with nothing committed
    # restarts from scratch, which the count of "resumed from" below would not see
    kills = sorted(random.Random(seed).sample(range(5, STEPS + 1), 3))
    print(f"SIGKILL of rank 1 after steps {kills} (DIST_TRAIN_FAULT_SEED={seed})")
    # and rank 0 killed in the middle of committing the checkpoint of step 12
    res = fault_run(workdir, "kills", f"faults.kill_at_steps={kills}", "ray.max_failures=4",
                    "faults.save=[{step: 12, phase: staged, rank: 0, action: kill}]")
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    out = res.stdout + res.stderr
    assert out.count("[faults] rank 1: SIGKILL") == 3 and out.count("resumed from") >= 3
    assert "[faults] rank 0: kill in the save of step 12 at staged" in out
    attempts = json.loads((workdir / "kills" / "pretrain" / "attempts.json").read_text())
    assert len(attempts) == 5  # the first start and four automatic restarts
    assert "restarting from the last committed checkpoint (restarts left after this one: 3)" in out
    summary = [ln for ln in out.splitlines() if ln.startswith("[pretrain] 5 attempts: attempt 1 failed at step ")]
    assert len(summary) == 1 and summary[0].endswith("attempt 5 completed"), out[-3000:]
    result = json.loads((workdir / "kills" / "pretrain" / "result.json").read_text())
    assert len(result["attempts_ended"]) == 5
    assert_exact(workdir, "kills", reference)
    res = run_cli("report", str(workdir / "kills"))  # the restarts, on the page and as lines on the plots
    assert res.returncode == 0, res.stderr
    page = (workdir / "kills" / "report.md").read_text()
    assert "4 restart(s); each is a red dashed line on the plots." in page
    assert "| pretrain | attempt 5 completed |" in page


def test_a_frozen_rank_is_named_in_time_and_a_damaged_checkpoint_skipped(workdir, reference):
    timeout = 10
    res = fault_run(workdir, "frozen", "faults.stop_at_step=6", "faults.corrupt_checkpoint=4",
                    f"ray.heartbeat_timeout_s={timeout}", "ray.max_failures=1")
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    out = res.stdout + res.stderr
    assert "[faults] rank 1: SIGSTOP after step 6" in out
    (incident,) = [json.loads(line) for line in
                   (workdir / "frozen" / "pretrain" / "incidents.jsonl").read_text().splitlines()]
    assert incident["kind"] == "stuck_rank" and incident["message"].startswith("rank 1 is not responding")
    quiet = float(incident["message"].split("no heartbeat for ")[1].split(" s")[0])
    assert timeout <= quiet <= timeout + 5, "named within the configured bound (plus one beat)"
    assert "[heartbeat] rank 1 is not responding" in out
    # the checkpoint of step 4 had a flipped byte: the restart used step 0 (a fresh start) instead
    assert "step_00000004 is damaged" in out and "does not match its recorded sha256" in out
    assert_exact(workdir, "frozen", reference)
    assert_no_secret(workdir, "frozen", res.stdout, res.stderr)


def test_sigterm_checkpoints_exits_for_requeue_and_the_rerun_resumes(workdir, reference):
    env = {**os.environ, **SECRETS}
    cmd = [sys.executable, "-m", "dist_train.cli", "run", *BASE, "output_dir=pre", "ray.preemption_grace_s=60"]
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "pre" / "pretrain" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and any(json.loads(line)["step"] >= 6 for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.2)
    t_term = time.time()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-3000:] + stdout[-3000:]  # EX_TEMPFAIL: requeue me
    assert time.time() - t_term < 60, "stopped within the grace period"
    result = json.loads((workdir / "pre" / "pretrain" / "result.json").read_text())
    assert result["preempted"] and 6 <= result["steps"] < STEPS
    latest = (workdir / "pre" / "pretrain" / "checkpoints" / "latest").read_text().strip()
    assert latest == result["checkpoint"] == f"step_{result['steps']:08d}", "a checkpoint at the stop step"
    assert "rerun the same command to resume" in stderr.lower()
    listed = run_cli("runs", str(workdir))
    (line,) = [ln for ln in listed.stdout.splitlines() if ln.startswith("pre ")]
    assert line.split()[1] == "resumable" and f"rerun resumes at pretrain step {result['steps']}" in line

    res = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {workdir / 'pre' / 'pretrain' / 'checkpoints' / latest}" in res.stdout
    assert_exact(workdir, "pre", reference)
    assert_no_secret(workdir, "pre", stdout, stderr, res.stdout, res.stderr)
