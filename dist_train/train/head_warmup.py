"""Head warm-up: train only the parameters a checkpoint lacked (a random head) for the first N steps,
then everything, in one run.

While the head warms up, the body's gradients are zeroed as they are computed (so neither the
gradient-norm clip nor Adam's moments see them; Adam's step count does advance, which only shifts
its bias correction) and its learning rate is 0 (so decoupled weight decay cannot move it either):
the body stays bit for bit the starting model's, and the head trains at a
constant `head_lr`, high because nothing else moves. From step N the head follows the schedule and
the body's learning rate ramps up over the configured warmup steps. Everything is a function of the
step, so a resume at any step lands in the same phase.
"""

from __future__ import annotations

import torch

from dist_train.train.engine import Engine

MIN_AUTO, MAX_AUTO, AUTO_SHARE = 10, 200, 0.1
HEAD_LR_SCALE = 10.0  # head_lr null: this many times optim.lr


def warmup_steps(configured: int | None, max_steps: int, has_new_head: bool, auto: bool = True) -> int:
    """The head warm-up of a stage: as configured (fewer than max_steps: config/checks.py), or (null,
    with `auto`) 10% of max_steps within [10, 200] and at most half the stage when the checkpoint
    lacked a head; 0 when it lacked none."""
    if not has_new_head:
        return 0
    if configured is None:
        return min(max(round(AUTO_SHARE * max_steps), MIN_AUTO), MAX_AUTO, max_steps // 2) if auto else 0
    return configured


def body_lr_factor(step: int, head_steps: int, ramp: int) -> float:
    """The body's share of the scheduled learning rate at (0-based) optimizer step `step`."""
    if step < head_steps:
        return 0.0
    return min(1.0, (step - head_steps + 1) / ramp) if ramp > 0 else 1.0


class HeadWarmup:
    """Holds the body still for `steps` steps while the head trains at `head_lr`, then lets the body
    join with a learning-rate ramp."""

    def __init__(self, engine: Engine, body: list[torch.nn.Parameter], steps: int, ramp: int, head_lr: float) -> None:
        self.engine, self.steps, self.ramp, self.head_lr = engine, steps, ramp, head_lr
        self.frozen = False
        for p in body:
            p.register_hook(self._grad)

    def _grad(self, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad) if self.frozen else grad

    def at(self, step: int) -> None:
        """Set the phase of the optimizer step that comes next (`step` steps are done)."""
        self.frozen = step < self.steps
        body = body_lr_factor(step, self.steps, self.ramp)
        if self.frozen:
            self.engine.set_group_lrs(lambda group, lr: 0.0 if group.get("body") else self.head_lr)
        else:
            self.engine.set_group_lrs(lambda group, lr: lr * body if group.get("body") else lr)
