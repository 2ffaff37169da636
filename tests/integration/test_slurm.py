"""slurm/dist-train.sbatch against a real Slurm: Debian's slurm-wlm on this machine.

`.ci/run` installs slurm-wlm and munge and starts a two-node cluster with
`slurm/local-cluster.sh start 2`: this host and a network namespace with its own address, each
with its own slurmd. It then sets DIST_TRAIN_REQUIRE_SLURM=1, so there these tests fail rather
than skip when Slurm (or its second node) is missing. Elsewhere they skip without `sinfo`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration
SBATCH = REPO / "slurm" / "dist-train.sbatch"
SHORT = ["pretrain.train.max_steps=30", "pretrain.train.eval_every=30", "pretrain.train.save_every=10",
         "finetune.train.max_steps=6", "finetune.train.eval_every=6", "finetune.train.save_every=6"]


def slurm_nodes() -> int:
    """Nodes of the Slurm cluster that can take a job (0 without Slurm)."""
    if not shutil.which("sbatch"):
        return 0
    res = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True)
    return sum(state.strip() in ("idle", "mix", "alloc") for state in res.stdout.splitlines()) \
        if res.returncode == 0 else 0


def need_nodes(n: int) -> None:
    if slurm_nodes() < n:
        if os.environ.get("DIST_TRAIN_REQUIRE_SLURM") == "1":
            pytest.fail(f"DIST_TRAIN_REQUIRE_SLURM=1 but Slurm has fewer than {n} usable nodes: run "
                        "slurm/local-cluster.sh start 2")
        pytest.skip(f"no Slurm cluster of {n} node(s) (sudo slurm/local-cluster.sh start {n} after apt-get "
                    "install slurm-wlm munge)")


@pytest.fixture(autouse=True)
def slurm():
    need_nodes(1)


def env() -> dict[str, str]:
    """The submitting shell: this venv first on PATH (sbatch passes the environment to the job)."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def sbatch(cwd: Path, *args: str, options: tuple[str, ...] = ()) -> str:
    res = subprocess.run(["sbatch", "--parsable", *options, str(SBATCH), *args], cwd=cwd, env=env(),
                         capture_output=True, text=True, check=True)
    return res.stdout.strip().split(";")[0]


def job_field(job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    m = re.search(rf"\b{field}=(\S+)", out)
    return m.group(1) if m else ""


def wait_until(cond, timeout: float, what: str, out: Path | None = None, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(poll)
    tail = out.read_text()[-4000:] if out is not None and out.exists() else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def finished(job: str) -> bool:
    return job_field(job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "")


def test_sbatch_runs_the_quickstart_survives_a_requeue_and_writes_the_report(tmp_path):
    """The quickstart under sbatch: Ray up on the allocation, the driver joins it, SIGTERM to the
    batch script mid-pretrain -> checkpoint -> exit 75 -> `scontrol requeue`; the requeued job
    resumes from that checkpoint, finishes both stages, and the data ledger shows every sample
    exactly once."""
    run = tmp_path / "run"
    job = sbatch(tmp_path, str(REPO / "configs" / "quickstart.yaml"), f"output_dir={run}", *SHORT)
    out = tmp_path / f"dist-train-{job}.out"
    # The first checkpoint (step 10) is the cue: the stop then lands well before step 30.
    wait_until(lambda: (run / "pretrain" / "checkpoints" / "step_00000010").is_dir(), 300, "checkpoint 10", out,
               poll=0.2)
    # What Slurm does at --signal=B:TERM@120 before the time limit: signal the batch shell only.
    subprocess.run(["scancel", "--batch", "--signal=TERM", job], check=True)
    wait_until(lambda: job_field(job, "Restarts") == "1" and job_field(job, "JobState") == "PENDING", 120,
               "the job to be requeued", out)
    # Slurm holds a requeued job for two minutes before it may start again; skip most of the wait. Started
    # within a moment of the requeue, slurmctld kills it ("Job credential revoked": the old start's credential
    # is still being revoked), so give that a few seconds.
    time.sleep(5)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    wait_until(lambda: finished(job), 600, "the requeued job to finish", out, poll=2)
    text = out.read_text()
    assert job_field(job, "JobState") == "COMPLETED", text[-4000:]

    report = json.loads((run / "report.json").read_text())
    assert report["stages"]["pretrain"]["steps"] == 30 and report["stages"]["finetune"]["steps"] == 6
    assert re.fullmatch(r"127\.0\.0\.1:\d{5}", report["config"]["ray"]["address"])  # the job's own Ray
    assert "1 Ray node(s) alive" in text
    m = re.search(r"stage pretrain stopped at step (\d+) on request; checkpoint (step_\d+) is committed", text)
    assert m, text[-4000:]
    assert f"requeued job {job}" in text and f"job {job}, start 2" in text
    assert f"[pretrain] resumed from {run}/pretrain/checkpoints/{m.group(2)} at step {m.group(1)}" in text
    ledger = subprocess.run([sys.executable, "-m", "dist_train.cli", "ledger", "verify", str(run)],
                            capture_output=True, text=True)
    assert ledger.returncode == 0 and "duplicated 0, missing 0" in ledger.stdout, ledger.stdout + ledger.stderr
    logs = tmp_path / "logs" / f"dist-train-{job}"
    assert {p.name for p in logs.iterdir()} >= {"ray-head.0.log", "ray-head.1.log", "validate.log"}
    # Ray is gone from the node once the job is over: no raylet of this job's session is left.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"/tmp/ray-{job}-" not in ps


def test_two_nodes_run_one_rank_each_over_the_network(tmp_path):
    """Two Slurm nodes with their own addresses (this host and a network namespace), one GPU asked
    for per node: the head on
    the first, a Ray worker node joined over the network on the second, one rank on each (each
    needs both of a node's CPUs), gloo between them. Without binding gloo to the interface Ray
    uses, the ranks would look for each other on loopback and never connect."""
    need_nodes(2)
    cwd, run = tmp_path, tmp_path / "run"
    job = sbatch(cwd, str(REPO / "configs" / "quickstart.yaml"), f"output_dir={run}", "finetune=null",
                 "ray.cpus_per_worker=2", "pretrain.train.max_steps=6", "pretrain.train.eval_every=6",
                 "pretrain.train.save_every=6", options=("--nodes=2", "--gpus-per-node=1"))
    out = cwd / f"dist-train-{job}.out"
    wait_until(lambda: finished(job), 600, "the two-node job", out, poll=2)
    text = out.read_text()
    assert job_field(job, "JobState") == "COMPLETED", text[-4000:]
    assert "2 Ray node(s) alive" in text
    # Each node told Ray what Slurm gave it: both CPUs, and the one GPU asked for per node (the
    # local cluster's GPUs are counts without devices; the run itself stays on CPU).
    assert len(re.findall(r"CPU 2 +GPU 1\b", text)) == 2, text[:3000]
    report = json.loads((run / "report.json").read_text())
    assert report["stages"]["pretrain"]["steps"] == 6
    head = report["config"]["ray"]["address"].rsplit(":", 1)[0]
    assert not head.startswith("127.")  # the other node reaches the head over the network
    beats = [json.loads(p.read_text()) for p in sorted((run / "pretrain" / "heartbeat").glob("rank_*.json"))]
    assert len(beats) == 2 and len({b["node"] for b in beats}) == 2, beats
    logs = {p.name for p in (cwd / "logs" / f"dist-train-{job}").iterdir()}
    assert any(name.startswith("ray-worker.0.") for name in logs), logs


def test_a_bad_config_fails_the_job_in_one_line_before_ray_starts(tmp_path):
    job = sbatch(tmp_path, str(REPO / "configs" / "quickstart.yaml"), "pretrain.train.max_stepz=3")
    out = tmp_path / f"dist-train-{job}.out"
    wait_until(lambda: finished(job), 120, "the job to fail", out)
    text = out.read_text()
    assert job_field(job, "JobState") == "FAILED" and job_field(job, "ExitCode") == "2:0", text
    assert "max_stepz" in text and "max_steps" in text, text
    assert "ray-head" not in " ".join(p.name for p in (tmp_path / "logs" / f"dist-train-{job}").iterdir())
    assert "Ray node" not in text
