"""Import DeepSpeed without the optional library it loads for a feature dist_train never uses.

DeepSpeed's autotuner imports MLflow when the package is imported, if MLflow is installed (as it is
wherever the MLflow tracker is used): about 1.2 s of CPU in every worker, on every attempt of every
stage, and in every command that reads a checkpoint. dist_train never runs DeepSpeed's autotuner, so
the first import of DeepSpeed in a process hides MLflow from it; MLflow stays importable for
everything else (the driver's tracker). Every module of dist_train imports DeepSpeed through here.
"""

from __future__ import annotations

import sys
from types import ModuleType


def import_deepspeed() -> ModuleType:
    """The deepspeed package, imported now if it was not (MLflow hidden from it while it loads)."""
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError
    try:
        import deepspeed
    finally:
        if hide and "mlflow" in sys.modules and sys.modules["mlflow"] is None:
            del sys.modules["mlflow"]
    return deepspeed
