"""The non-finite guard's count across checks: flags noted per step on the device, decided in order at a check."""

from dataclasses import dataclass

import pytest
import torch

from dist_train.train.loop import NonFiniteGuard, NonFiniteLoss


@dataclass
class Norm:
    """What the guard reads of an engine after a step: fp16's loss scale (None: not fp16) and the gradient norm
    (DeepSpeed holds a float or a device tensor)."""

    grad_norm_held: float | torch.Tensor | None = 1.0
    loss_scale: float | None = None


def steps(guard: NonFiniteGuard, first: int, losses: list[float], norm=1.0) -> list[float]:
    for i, loss in enumerate(losses):
        guard.note(first + i, torch.tensor(loss), Norm(norm))
    return guard.flags()


def test_a_run_of_bad_steps_counts_across_checks_and_a_good_step_resets_it():
    guard = NonFiniteGuard(patience=3)
    assert steps(guard, 1, [1.0, float("nan")]) == [0.0, 1.0]
    assert guard.update([0.0, 1.0]) is True, "the last step of the interval was bad: not evaluated, not saved"
    assert steps(guard, 3, [float("inf"), 2.0]) == [1.0, 0.0]
    assert guard.update([1.0, 0.0]) is False and guard.bad == 0, "a finite step ends the run of bad ones"
    assert steps(guard, 5, [float("nan")]) == [1.0]
    assert guard.update([1.0]) is True
    steps(guard, 6, [float("nan"), float("nan"), float("nan")])
    with pytest.raises(NonFiniteLoss, match=r"for 4 consecutive step\(s\) \(steps 5-8\)"):
        guard.update([1.0, 1.0, 1.0])


def test_another_ranks_flag_counts_and_a_bad_norm_counts_outside_fp16():
    guard = NonFiniteGuard(patience=3)
    assert steps(guard, 1, [1.0]) == [0.0]
    assert guard.update([1.0]) is True, "the all-reduced flag: another rank's step was not finite"
    assert steps(guard, 2, [1.0], norm=float("nan")) == [1.0]
    assert guard.update([1.0]) is True
    steps(guard, 3, [1.0], norm=None)  # no norm computed: the loss decides
    assert guard.flags() == [0.0] and guard.update([0.0]) is False and guard.bad == 0
    assert steps(guard, 4, [1.0, 1.0, 1.0], norm=torch.tensor(float("inf"))) == [1.0] * 3, "a norm on the device"
    with pytest.raises(NonFiniteLoss, match=r"\(steps 4-6\)"):
        guard.update([1.0] * 3)
    fp16 = NonFiniteGuard(patience=2)
    fp16.note(1, torch.tensor(1.0), Norm(float("inf"), loss_scale=2.0**16))
    assert fp16.flags() == [0.0], "fp16's loss scaler skips its own overflow steps"
    assert fp16.update([0.0]) is False and NonFiniteGuard(1).flags() == []
