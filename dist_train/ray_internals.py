"""The places dist_train reaches below Ray's public API, all in this module.

- Ray Train's torch backend class (`ray.train.torch.config._TorchBackend`): the only way to run code
  on every worker after the worker group starts and before the process group forms, which is where
  gloo's socket interface must be pinned (launch/torch_backend.py).
- Whether this process is a Ray worker (`ray._private.worker.global_worker.mode`): the public
  runtime context logs a warning when a driver asks, and progress bars must know without a word.
- The logger of Ray's token-auth notice, silenced for private local instances.

Checked against Ray CHECKED_RAY (pyproject.toml pins it); tests/unit/test_ray_internals.py fails
loudly when an installed Ray no longer has any of them, naming this module.
"""

from __future__ import annotations

import sys

CHECKED_RAY = "2.60"
AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def torch_backend_base() -> type:
    """Ray Train's torch Backend class, to subclass with an on_start of our own."""
    from ray.train.torch.config import _TorchBackend

    return _TorchBackend


def in_ray_worker() -> bool:
    """True inside a Ray worker process (a task or an actor), False in a driver or without Ray."""
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized() and ray._private.worker.global_worker.mode == ray.WORKER_MODE
