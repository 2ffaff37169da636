"""Joining an existing Ray cluster: wait for its nodes, and check it can hold the workers.

`python -m dist_train.launch.cluster wait --address HOST:PORT --nodes N` is what the Slurm script
runs between starting Ray on every node and starting the driver: it returns once N nodes are
alive (printing each with its CPUs and GPUs), or fails in one line naming how many joined.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any


class ClusterError(RuntimeError):
    """The Ray cluster cannot run this job as configured; the message says what to change."""


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def describe_nodes(nodes: list[dict[str, Any]]) -> str:
    rows = []
    for n in sorted(nodes, key=lambda n: n["NodeManagerAddress"]):
        res = n.get("Resources", {})
        rows.append(f"  {n['NodeManagerAddress']:<16} {n.get('NodeManagerHostname', ''):<24} "
                    f"CPU {res.get('CPU', 0):g}  GPU {res.get('GPU', 0):g}")
    return "\n".join(rows)


def wait_for_nodes(address: str, nodes: int, timeout_s: float, poll_s: float = 1.0) -> list[dict[str, Any]]:
    """Connect to the cluster at `address` and return once `nodes` nodes are alive.

    Raises ClusterError after `timeout_s` with the number that did join, so a node whose raylet
    failed to start is reported before any training resource is spent waiting for it.
    """
    import ray

    ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            up = alive_nodes()
            if len(up) >= nodes:
                return up
            if time.monotonic() > deadline:
                raise ClusterError(f"only {len(up)} of {nodes} Ray nodes joined {address} within {timeout_s:.0f} s; "
                                   "see the ray-worker logs of this job for the node that did not start")
            time.sleep(poll_s)
    finally:
        ray.shutdown()


def check_capacity(num_workers: int, cpus_per_worker: int, use_gpu: bool, address: str) -> None:
    """Fail in one line when the connected cluster cannot place every worker at once.

    Ray Train would otherwise wait for resources that never come, silently.
    """
    import ray

    total = ray.cluster_resources()
    nodes = alive_nodes()
    need_cpu = num_workers * cpus_per_worker
    if use_gpu and total.get("GPU", 0) < num_workers:
        raise ClusterError(f"ray.num_workers={num_workers} needs {num_workers} GPUs, but the Ray cluster at {address} "
                           f"has {total.get('GPU', 0):g} on {len(nodes)} node(s); lower ray.num_workers or ask "
                           "for more GPUs (sbatch --gpus-per-node, more nodes)")
    if total.get("CPU", 0) < need_cpu:
        raise ClusterError(f"ray.num_workers={num_workers} × ray.cpus_per_worker={cpus_per_worker} needs {need_cpu} "
                           f"CPUs, but the Ray cluster at {address} has {total.get('CPU', 0):g} on {len(nodes)} "
                           "node(s); lower them or ask for more CPUs (sbatch --exclusive or --cpus-per-task)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dist_train.launch.cluster")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait", help="wait until N nodes have joined the Ray cluster")
    w.add_argument("--address", required=True, help="GCS address, HOST:PORT")
    w.add_argument("--nodes", type=int, required=True)
    w.add_argument("--timeout", type=float, default=300.0, help="seconds")
    args = ap.parse_args(argv)
    try:
        up = wait_for_nodes(args.address, args.nodes, args.timeout)
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{len(up)} Ray node(s) alive:\n{describe_nodes(up)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
