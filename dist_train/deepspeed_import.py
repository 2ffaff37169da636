"""Import DeepSpeed without the optional library it loads for a feature dist_train never uses.

DeepSpeed's autotuner imports MLflow when the package is imported, if MLflow is installed (as it is
wherever the MLflow tracker is used): about 1.2 s of CPU in every worker, on every attempt of every
stage, and in every command that reads a checkpoint. dist_train never runs DeepSpeed's autotuner, so
the first import of DeepSpeed in a process hides MLflow from it; MLflow stays importable for
everything else (the driver's tracker). Every module of dist_train imports DeepSpeed through here.

Its torch communication backend also compiles a shared-memory all-reduce op with the C++ compiler when
it starts on CPU: 77 s on the first run of a fresh machine here (then cached in ~/.cache/torch_extensions,
which a container, a new node or another HOME does not share). That op serves only
`inference_all_reduce` (DeepSpeed's tensor-parallel inference); training all-reduces through
torch.distributed, so dist_train does not build it. This is the one reach into DeepSpeed's internals,
and tests/unit/test_deepspeed_import.py fails loudly if the function it replaces disappears.
"""

from __future__ import annotations

import sys
from types import ModuleType


def import_deepspeed() -> ModuleType:
    """The deepspeed package, imported now if it was not (MLflow hidden from it while it loads), its
    communication backend set not to build the inference-only shared-memory op."""
    if "deepspeed" in sys.modules:
        return _without_shm_op(sys.modules["deepspeed"])
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError
    try:
        import deepspeed
    finally:
        if hide and "mlflow" in sys.modules and sys.modules["mlflow"] is None:
            del sys.modules["mlflow"]
    return _without_shm_op(deepspeed)


def _without_shm_op(deepspeed: ModuleType) -> ModuleType:
    backend = sys.modules.get("deepspeed.comm.torch")
    if backend is not None and hasattr(backend, "build_shm_op"):
        # TorchBackend.__init__ looks the name up when a process group starts; None = "op unavailable",
        # and inference_all_reduce then falls back to torch.distributed.all_reduce
        backend.build_shm_op = _no_shm_op
    return deepspeed


def _no_shm_op() -> None:
    return None
