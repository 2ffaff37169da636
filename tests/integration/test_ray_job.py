"""`ray job submit` of the quickstart to a real Ray cluster started with `ray start`.

Two Ray nodes on this machine (a head and a second node, each with one CPU, so the two
workers must land one on each), token auth on, the dashboard and jobs API on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
SHORT = ["pretrain.train.max_steps=6", "pretrain.train.eval_every=6", "pretrain.train.save_every=6", "finetune=null"]
# What launch/README.md tells people to pass: the run and the built data stay out of the upload.
RUNTIME_ENV = {"excludes": ["runs/", "data/quickstart/", "logs/", "dist-train-*.out"]}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head and a second node, both one CPU; yields (env with the token, jobs API URL)."""
    token = secrets.token_hex(16)
    home = tmp_path_factory.mktemp("home")  # no ~/.ray/auth_token: the token comes from the environment
    # DeepSpeed's CPU ops are compiled once into ~/.cache/torch_extensions: the fresh HOME keeps using the real
    # one (compiling its shared-memory op again took ~100 s of the job's worker setup)
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HOME": str(home), "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0", "TORCH_EXTENSIONS_DIR": extensions}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, client, *second = free_ports(12)
    tmp = f"/tmp/dtjob-{os.getpid()}"  # Ray's socket paths must stay short

    def ray(*args: str) -> None:
        res = subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}", f"--ray-client-server-port={client}", "--num-cpus=1", f"--temp-dir={tmp}",
        "--disable-usage-stats")
    try:
        p = iter(second)
        ray("start", f"--address=127.0.0.1:{gcs}", "--num-cpus=1", f"--temp-dir={tmp}", "--disable-usage-stats",
            f"--node-manager-port={next(p)}", f"--object-manager-port={next(p)}",
            f"--runtime-env-agent-port={next(p)}", f"--dashboard-agent-grpc-port={next(p)}",
            f"--dashboard-agent-listen-port={next(p)}", f"--metrics-export-port={next(p)}")
        wait = subprocess.run([sys.executable, "-m", "dist_train.launch.cluster", "wait", "--address",
                               f"127.0.0.1:{gcs}", "--nodes", "2", "--timeout", "60"],
                              env=env, capture_output=True, text=True, cwd=REPO)
        assert wait.returncode == 0, wait.stdout + wait.stderr
        api = f"http://127.0.0.1:{dash}"
        # The jobs API answers "No available agent to submit job" until the head's dashboard agent
        # has registered, a few seconds after `ray start` returns: submit a no-op until it runs.
        for _ in range(60):
            probe = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", api, "--", "true"], env=env,
                                   capture_output=True, text=True, timeout=120)
            if probe.returncode == 0:
                break
            time.sleep(1)
        assert probe.returncode == 0, probe.stdout[-2000:] + probe.stderr[-2000:]
        yield env, api, f"127.0.0.1:{gcs}"
    finally:
        stop_cluster(tmp)


def stop_cluster(temp_dir: str) -> None:
    """Stop the Ray processes started with `temp_dir` (GCS, raylets, dashboard, agents; their workers exit with
    their raylet) and only those: `ray stop` would also stop every other Ray on the machine, such as the
    private instance of a test running beside this one."""
    import psutil

    def ours() -> list[psutil.Process]:
        found = set()
        for proc in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if any(temp_dir in arg for arg in proc.info["cmdline"] or []):
                    # with their children: the agents and workers retitle themselves ("ray::DashboardAgent")
                    found |= {proc, *proc.children(recursive=True)}
        return list(found)

    for proc in ours():
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(ours(), timeout=15)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def node_ids(env: dict[str, str], gcs: str) -> set[str]:
    code = (f"import json, ray; ray.init(address={gcs!r}, logging_level='ERROR', log_to_driver=False); "
            "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return set(json.loads(res.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The quickstart's prepare.dir, shared by the tests of this module (built once)."""
    return tmp_path_factory.mktemp("qsdata") / "data"


def test_ray_job_submit_runs_the_quickstart_on_the_cluster(cluster, data, tmp_path):
    env, api, gcs = cluster
    run = tmp_path / "run"
    res = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", api, "--working-dir", str(REPO),
                          "--runtime-env-json", json.dumps(RUNTIME_ENV), "--",
                          "dist-train", "run", "configs/quickstart.yaml", f"output_dir={run}", f"prepare.dir={data}",
                          *SHORT], env=env, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "succeeded" in out, out[-4000:]
    report = json.loads((run / "report.json").read_text())
    assert report["stages"]["pretrain"]["steps"] == 6
    assert report["config"]["ray"]["address"] is None  # joined through RAY_ADDRESS, as `ray job submit` sets it
    # The two workers ran on the two nodes of this cluster, one each (each node has one CPU).
    beats = [json.loads(p.read_text()) for p in sorted((run / "pretrain" / "heartbeat").glob("rank_*.json"))]
    assert {b["node"] for b in beats} == node_ids(env, gcs) and len(beats) == 2
    assert (data / "shards" / "manifest.json").is_file()  # the data was built where we asked, not in the upload


def test_a_relative_output_dir_is_refused_inside_a_ray_job(cluster):
    env, api, _ = cluster
    res = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", api, "--working-dir", str(REPO),
                          "--runtime-env-json", json.dumps(RUNTIME_ENV), "--",
                          "dist-train", "run", "configs/quickstart.yaml"], env=env, capture_output=True, text=True,
                         timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "output_dir='runs/quickstart' is relative, and this driver runs in a Ray job's temporary working " \
           "directory" in out, out[-3000:]


def test_more_workers_than_the_cluster_holds_fail_in_one_line(cluster, data, tmp_path):
    """Ray Train would wait for the third CPU forever; the driver says so and stops."""
    env, _, gcs = cluster
    res = subprocess.run([sys.executable, "-m", "dist_train.cli", "run", "configs/quickstart.yaml",
                          f"output_dir={tmp_path / 'run'}", f"prepare.dir={data}", f"ray.address={gcs}",
                          "ray.num_workers=3", "pretrain.train.global_batch_size=24", "finetune=null"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ray.num_workers=3 × ray.cpus_per_worker=1 needs 3 CPUs, but the Ray cluster at "
                           f"{gcs} has 2 on 2 node(s)"), last
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_the_jobs_api_refuses_a_client_without_the_token(cluster, tmp_path):
    env, api, _ = cluster
    bare = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    res = subprocess.run([str(BIN / "ray"), "job", "list", "--address", api], env=bare, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0, res.stdout
    assert "token" in (res.stdout + res.stderr).lower()


def test_a_local_run_starts_its_own_ray_beside_a_colleagues_cluster(cluster, data, tmp_path):
    """With a `ray start` cluster on the machine that Ray's own lookup file names (as a colleague's would be),
    a run without ray.address starts a private instance: it neither joins that cluster (which made Ray
    refuse num_cpus) nor lets Ray Train's cleaner query it; no traceback reaches the console."""
    env, _, gcs = cluster
    ray_tmp = Path(f"/tmp/dtl-{os.getpid()}")  # short: Ray's socket paths live under it
    (ray_tmp / "ray").mkdir(parents=True, exist_ok=True)
    (ray_tmp / "ray" / "ray_current_cluster").write_text(gcs)  # what `ray start` leaves for ray.init() to find
    before = node_ids(env, gcs)
    try:
        res = subprocess.run([sys.executable, "-m", "dist_train.cli", "run", "configs/quickstart.yaml",
                              f"output_dir={tmp_path / 'run'}", f"prepare.dir={data}", *SHORT],
                             env={**env, "RAY_TMPDIR": str(ray_tmp)}, cwd=REPO, capture_output=True, text=True,
                             timeout=600)
    finally:
        subprocess.run(["rm", "-rf", str(ray_tmp)])
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "Traceback" not in out and "PlacementGroupCleaner" not in out, out[-4000:]
    assert json.loads((tmp_path / "run" / "report.json").read_text())["stages"]["pretrain"]["steps"] == 6
    assert node_ids(env, gcs) == before, "the colleague's cluster is as it was"
