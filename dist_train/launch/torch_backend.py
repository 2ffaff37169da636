"""Ray Train's torch process-group setup, with gloo bound to the interface Ray itself uses.

Gloo binds to whatever this host's name resolves to. On many systems that is a loopback address
(Debian maps the host name to 127.0.1.1; containers often to 127.0.0.1), and ranks on other hosts
then cannot connect: a multi-node CPU run, or any gloo collective between nodes, hangs until the
timeout. Before the process group is created, each worker therefore pins GLOO_SOCKET_IFNAME to the
interface that holds its Ray node address, the address the cluster already reaches it at. A
GLOO_SOCKET_IFNAME you set yourself is left alone.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from ray.train.torch import TorchConfig

from dist_train.ray_internals import torch_backend_base


def interface_of(ip: str, interfaces: dict[str, list[tuple[int, str]]]) -> str | None:
    """The name of the interface that holds IPv4 address `ip`, or None (loopback addresses: None).

    `interfaces` maps a name to its (family, address) pairs, as psutil.net_if_addrs() gives them."""
    if ip.startswith("127."):
        return None
    for name, addrs in sorted(interfaces.items()):
        if any(family == socket.AF_INET and addr == ip for family, addr in addrs):
            return name
    return None


def pin_gloo_interface() -> str | None:
    """Set GLOO_SOCKET_IFNAME in this worker to the interface of its Ray node address (see module doc)."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return os.environ["GLOO_SOCKET_IFNAME"]
    import psutil
    import ray

    found = {name: [(a.family, a.address) for a in addrs] for name, addrs in psutil.net_if_addrs().items()}
    name = interface_of(ray.util.get_node_ip_address(), found)
    if name is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = name
    return name


class _PinnedGlooBackend(torch_backend_base()):  # type: ignore[misc]  # Ray's private base (ray_internals.py)
    def on_start(self, worker_group, backend_config) -> None:
        worker_group.execute(pin_gloo_interface)
        super().on_start(worker_group, backend_config)


@dataclass
class ClusterTorchConfig(TorchConfig):
    """TorchConfig whose process group binds gloo to the interface Ray uses on each node."""

    @property
    def backend_cls(self):
        return _PinnedGlooBackend
