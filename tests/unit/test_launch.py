"""The launch recipes people copy: checked against Ray's own cluster schema, the CLI's config
loader and the Llama-3-8B recipe, so an example cannot drift from what the tool accepts.
(The Slurm script and `ray job submit` run for real in tests/integration.)"""

from __future__ import annotations

import re
import shlex
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from dist_train.config.loader import load_config
from tests.conftest import REPO

LAUNCH = REPO / "launch"
RECIPE = REPO / "configs" / "llama3_8b_domain.yaml"


def test_the_ray_cluster_yaml_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((LAUNCH / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(cfg))
    head = " ".join(cfg["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["worker_start_ray_commands"])
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    bad = {**cfg, "available_node_types": {**cfg["available_node_types"], "gpu8": {
        **cfg["available_node_types"]["gpu8"], "min_worker": 4}}}
    with pytest.raises(Exception, match="min_worker"):  # the check bites: a typo is refused
        validate_config(prepare_config(bad))


def entrypoint_config(entrypoint: str):
    """The config a `dist-train run CONFIG overrides...` entrypoint resolves to, read from this repo."""
    args = shlex.split(entrypoint)
    assert args[:2] == ["dist-train", "run"], entrypoint
    config = REPO / "configs" / Path(args[2]).name
    overrides = [a for a in args[3:] if not a.startswith("model.name_or_path=")]  # weights are not here
    return load_config(config, overrides)


def test_the_kuberay_rayjob_matches_the_recipe_it_runs():
    job = yaml.safe_load((LAUNCH / "kuberay-rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == version("ray")  # the image's Ray must match the workers' client
    assert cluster["authOptions"] == {"mode": "token"}
    cfg = entrypoint_config(spec["entrypoint"])
    assert cfg.output_dir.startswith("/shared/")  # a Ray job's working dir is temporary
    gpus = sum(int(g["replicas"]) * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                                        ["nvidia.com/gpu"]) for g in cluster["workerGroupSpecs"])
    cpus = sum(int(g["replicas"]) * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
               for g in cluster["workerGroupSpecs"])
    assert cfg.ray.use_gpu and gpus == cfg.ray.num_workers and cpus >= cfg.ray.num_workers * cfg.ray.cpus_per_worker
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"


def test_the_documented_sbatch_line_gives_the_recipe_its_workers():
    line = " ".join(ln.lstrip("# ").rstrip("\\ ") for ln in RECIPE.read_text().splitlines()
                    if "sbatch" in ln or "configs/llama3_8b_domain.yaml model." in ln)
    nodes = int(re.search(r"--nodes=(\d+)", line).group(1))
    gpus = int(re.search(r"--gpus-per-node=(\d+)", line).group(1))
    cpus = int(re.search(r"--cpus-per-task=(\d+)", line).group(1))
    cfg = load_config(RECIPE)
    assert nodes * gpus == cfg.ray.num_workers and nodes * cpus >= cfg.ray.num_workers * cfg.ray.cpus_per_worker
    assert "slurm/dist-train.sbatch" in line and (REPO / "slurm" / "dist-train.sbatch").is_file()


@pytest.mark.parametrize("script", ["slurm/dist-train.sbatch", "slurm/local-cluster.sh", ".ci/run"])
def test_shell_scripts_parse(script):
    res = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_the_plan_in_the_launch_guide_is_what_the_command_prints_now():
    from tests.conftest import run_cli

    doc = (REPO / "docs" / "launch.md").read_text()
    shown = doc.split("<!-- plan:begin -->\n", 1)[1].split("\n<!-- plan:end -->", 1)[0]
    res = run_cli("validate", "configs/llama3_8b_domain.yaml", "--plan", "--nodes", "4", "--gpus-per-node", "8",
                  "--gpu-memory", "80GB")
    assert res.returncode == 0, res.stderr
    assert shown == res.stdout.rstrip(), ("docs/launch.md shows a stale plan: paste the output of `dist-train "
                                          "validate configs/llama3_8b_domain.yaml --plan --nodes 4 --gpus-per-node 8 "
                                          "--gpu-memory 80GB` between its plan markers")


def test_gloo_binds_the_interface_that_holds_the_ray_address():
    import socket

    from dist_train.launch.torch_backend import interface_of

    found = {"lo": [(socket.AF_INET, "127.0.0.1")], "eth0": [(socket.AF_INET, "192.0.2.2"), (socket.AF_INET6, "fd::2")],
             "ib0": [(socket.AF_INET, "10.77.0.1")]}
    assert interface_of("10.77.0.1", found) == "ib0"
    assert interface_of("192.0.2.2", found) == "eth0"
    assert interface_of("127.0.0.1", found) is None  # one host: gloo's own choice is right
    assert interface_of("10.9.9.9", found) is None
