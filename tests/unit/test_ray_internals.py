"""Ray's internals that dist_train uses (dist_train/ray_internals.py) are still where it reaches for them."""

import logging
import re
from pathlib import Path

import ray

from dist_train import ray_internals

REPO = Path(__file__).resolve().parents[2]
WHERE = "dist_train/ray_internals.py reaches for it: adapt that module to this Ray, or install the pinned one"


def test_the_pinned_ray_is_the_checked_one():
    pin = re.search(r'"ray\[[^\]]*\]>=([0-9.]+),', (REPO / "pyproject.toml").read_text()).group(1)
    assert pin.startswith(ray_internals.CHECKED_RAY) and ray.__version__.startswith(ray_internals.CHECKED_RAY), (
        f"Ray {ray.__version__}, checked {ray_internals.CHECKED_RAY}, pinned {pin}: {WHERE}")


def test_ray_trains_torch_backend_can_still_be_extended():
    base = ray_internals.torch_backend_base()
    assert callable(getattr(base, "on_start", None)), f"Ray Train's torch backend has no on_start: {WHERE}"
    from dist_train.launch.torch_backend import ClusterTorchConfig, _PinnedGlooBackend

    assert issubclass(_PinnedGlooBackend, base) and ClusterTorchConfig().backend_cls is _PinnedGlooBackend


def test_the_worker_mode_and_the_auth_logger_are_where_they_were():
    assert hasattr(ray, "WORKER_MODE") and hasattr(ray._private.worker.global_worker, "mode"), WHERE
    assert not ray_internals.in_ray_worker()  # this test process is no Ray worker
    import ray._private.authentication.authentication_token_setup as auth

    assert logging.getLogger(ray_internals.AUTH_NOTICE_LOGGER) is logging.getLogger(auth.__name__), WHERE
