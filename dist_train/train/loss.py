"""Losses as sums over their targets, so the loop can weight every target of the global batch once.

A micro batch with no target (all masked out, all padding) gives a zero loss and zero gradient
instead of the NaN of a mean over nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

IGNORE = -100
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool) -> torch.Tensor:
    """Summed cross-entropy of a language model; `shift` predicts token t+1 from position t (clm)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1)
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")


def classification_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over examples (B, C); label -100 marks an example that does not count."""
    return torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")


def loss_for(objective: str) -> LossFn:
    if objective == "clm":
        return lambda logits, labels: lm_loss_sum(logits, labels, shift=True)
    if objective == "mlm":
        return lambda logits, labels: lm_loss_sum(logits, labels, shift=False)
    return classification_loss_sum
