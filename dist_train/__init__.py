"""dist_train: exact, survivable domain adaptation of transformers on Ray Train + DeepSpeed ZeRO.

The Python API is `load_config` and `run` (see dist_train/api.py); the CLI is `dist-train`.
"""

from dist_train.api import load_config, run

__all__ = ["load_config", "run"]
