"""Losses as sums over their targets, so the loop can weight every target of the global batch once.

A micro batch with no target (all masked out, all padding) gives a zero loss and zero gradient
instead of the NaN of a mean over nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dist_train.model.lm_head import LMLoss, lm_loss_sum

__all__ = ["LMLoss", "LossFn", "classification_loss_sum", "lm_loss_sum", "loss_for"]
IGNORE = -100
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def classification_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over examples (B, C); label -100 marks an example that does not count."""
    return torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")


def loss_for(objective: str) -> LossFn:
    if objective in ("clm", "mlm"):
        return LMLoss(shift=objective == "clm")
    return classification_loss_sum
