"""Per-rank model-state memory under ZeRO: the ZeRO paper's arithmetic (Rajbhandari et al. 2020, §3).

Mixed-precision Adam keeps, per parameter, 2 bytes of 16-bit weights, 2 bytes of 16-bit
gradients and K = 12 bytes of optimizer state (fp32 master weights, momentum, variance): 16
bytes in all. ZeRO-1 partitions the optimizer state over the N data-parallel ranks, ZeRO-2 the
gradients too, ZeRO-3 the weights too. In fp32 training, weights and gradients take 4 bytes each
and the optimizer 8 (momentum, variance; the weights are their own master copy). Offload moves
the partitioned optimizer state (and, at stage 3, the weights) to CPU memory.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelStateBytes:
    """Bytes of model state one rank holds, split by kind and by device."""

    weights: float
    gradients: float
    optimizer: float
    on_cpu: float  # the part of the above that offload keeps in CPU memory

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def on_device(self) -> float:
        return self.total - self.on_cpu


def model_state_bytes(params: float, zero_stage: int, world: int, precision: str = "bf16",
                      offload_optimizer: bool = False, offload_params: bool = False) -> ModelStateBytes:
    """Per-rank bytes of weights, gradients and Adam state for `params` parameters (ZeRO paper §3)."""
    half = precision in ("bf16", "fp16")
    w_b, g_b, k = (2, 2, 12) if half else (4, 4, 8)
    weights = params * w_b / (world if zero_stage >= 3 else 1)
    grads = params * g_b / (world if zero_stage >= 2 else 1)
    optim = params * k / (world if zero_stage >= 1 else 1)
    on_cpu = (optim if offload_optimizer else 0.0) + (weights if offload_params else 0.0)
    return ModelStateBytes(weights=weights, gradients=grads, optimizer=optim, on_cpu=on_cpu)
