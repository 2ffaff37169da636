"""No pickle code runs when a checkpoint is read: every `torch.load` in a worker is `weights_only`.

DeepSpeed hard-codes `torch.load(..., weights_only=False)` in its engine, its ZeRO-to-fp32 and its
universal-checkpoint converter: a crafted checkpoint could run code on every rank. torch's
TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 overrides those calls; the few DeepSpeed classes its checkpoints
legitimately hold (an enum, the loss scaler, a named tuple) are allow-listed by name, nothing else.

Run as `python -m dist_train.checkpoint.safe_load ARGS` it is DeepSpeed's `ds_to_universal`
converter under the same rule.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import sys
from collections.abc import Iterator

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def deepspeed_globals() -> list[type]:
    """The non-tensor classes found in DeepSpeed checkpoints (ZeRO 0-3, bf16/fp16/fp32, universal)."""
    from dist_train.deepspeed_import import import_deepspeed

    import_deepspeed()
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def allow_deepspeed_checkpoints() -> None:
    """For this whole process (a worker): force weights_only loads, allowing DeepSpeed's classes."""
    import torch

    torch.serialization.add_safe_globals(deepspeed_globals())
    os.environ[FORCE_ENV] = "1"


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """The same rule for a block of code only (export and inspection in the driver process)."""
    import torch

    before = os.environ.get(FORCE_ENV)
    os.environ[FORCE_ENV] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_globals()):
            yield
    finally:
        if before is None:
            os.environ.pop(FORCE_ENV, None)
        else:
            os.environ[FORCE_ENV] = before


if __name__ == "__main__":
    allow_deepspeed_checkpoints()
    sys.argv = ["ds_to_universal", *sys.argv[1:]]
    runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__")
