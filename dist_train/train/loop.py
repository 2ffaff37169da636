"""The training loop: the whole step sequence of both stages, readable top to bottom.

forward/backward over the accumulation micro batches -> (DeepSpeed: clip, step, schedule)
-> log -> eval -> checkpoint. Everything it uses is built before and passed in. The loss is
token-weighted: every predicted token of the global batch counts once, however padding or
masking falls across micro batches and ranks (one small all-reduce of target counts per step).
The loss value itself is read from the device only at log, eval and save steps.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from dist_train.data.ledger import Ledger
from dist_train.model.build import FlopsModel
from dist_train.train.engine import Engine
from dist_train.train.loss import LossFn
from dist_train.train.metrics import MetricsLog, Throughput, memory_mb
from dist_train.world import World


@dataclass
class StepBatch:
    """One optimizer step's data on this rank: its micro batches and their real (non-pad) token count."""

    micro: list[dict[str, torch.Tensor]]
    targets: list[int]  # predicted positions (labels that count) in each micro batch
    tokens: int
    attention_units: int  # the sum of each sequence's squared real length (the attention FLOPs' share)
    ids: list[tuple[str, int]] | None = None  # (shard file, sample) per row, for the ledger
    replaced: int = 0  # bad samples the loader replaced (on_bad_sample=skip)


@dataclass
class TrainState:
    """Counters that must survive a restart (stored in every checkpoint's client state)."""

    step: int = 0
    tokens: int = 0
    replaced_samples: int = 0
    last_loss: float = float("nan")
    last_eval: dict[str, float] = field(default_factory=dict)
    eval_step: int = -1  # the step last_eval was measured at
    baseline: dict[str, float] = field(default_factory=dict)  # the evaluation at step 0, before any update
    reference: dict[str, float] = field(default_factory=dict)  # what "before" means: the baseline, or the
    reference_step: int = -1  # evaluation at the end of a head warm-up (the body still the starting model's)
    best: float | None = None  # early stopping: the best value of its metric so far
    bad_evals: int = 0  # evaluations since it last improved
    stopped_early: bool = False
    preempted: bool = False  # stopped at a step boundary on request (SIGTERM); not saved

    def state_dict(self) -> dict:
        """Plain Python values only (numpy scalars from metrics become floats): checkpoints load
        with weights_only=True."""
        return json.loads(json.dumps(
            {"step": self.step, "tokens": self.tokens, "replaced_samples": self.replaced_samples,
             "last_loss": self.last_loss, "last_eval": self.last_eval, "eval_step": self.eval_step,
             "baseline": self.baseline, "reference": self.reference, "reference_step": self.reference_step,
             "best": self.best, "bad_evals": self.bad_evals, "stopped_early": self.stopped_early}, default=float))

    def load_state_dict(self, d: dict) -> None:
        self.step, self.tokens, self.last_loss = int(d["step"]), int(d["tokens"]), float(d["last_loss"])
        self.replaced_samples = int(d.get("replaced_samples", 0))
        self.last_eval = dict(d.get("last_eval", {}))
        self.eval_step = int(d.get("eval_step", -1))
        self.baseline, self.reference = dict(d.get("baseline", {})), dict(d.get("reference", {}))
        self.reference_step = int(d.get("reference_step", -1))
        self.best, self.bad_evals = d.get("best"), int(d.get("bad_evals", 0))
        self.stopped_early = bool(d.get("stopped_early", False))


@dataclass(frozen=True)
class Cadence:
    max_steps: int
    log_every: int
    eval_every: int  # 0: only at the end
    save_every: int  # 0: only at the end
    also_eval: tuple[int, ...] = ()  # further evaluation steps (the end of a head warm-up)

    def due(self, step: int, every: int) -> bool:
        return step == self.max_steps or (every > 0 and step % every == 0)

    def eval_due(self, step: int) -> bool:
        return self.due(step, self.eval_every) or step in self.also_eval


@dataclass(frozen=True)
class EarlyStopping:
    """Stop when `metric` has not improved by more than `min_delta` for `patience` evaluations.
    Evaluations are all-reduced, so every rank takes the same decision at the same step."""

    metric: str
    higher_is_better: bool
    patience: int
    min_delta: float = 0.0

    def should_stop(self, state: TrainState, evaluation: dict[str, float]) -> bool:
        value = evaluation.get(self.metric)
        if not evaluation or (value is not None and value != value):  # no validation data, or NaN: nothing to judge
            return False
        # an evaluation without the metric (adapted_loss over the forgetting limit) is no improvement
        better = value is not None and (state.best is None or (
            value > state.best + self.min_delta if self.higher_is_better else value < state.best - self.min_delta))
        state.best, state.bad_evals = (value, 0) if better else (state.best, state.bad_evals + 1)
        return state.bad_evals >= self.patience


class NonFiniteLoss(RuntimeError):
    """The loss (or gradient norm) was not finite for `patience` consecutive steps."""


@dataclass
class NonFiniteGuard:
    """Counts consecutive steps whose loss (or, outside fp16, gradient norm) was NaN or infinite on any rank,
    and stops the run at `patience` of them. Every rank sees the same count (an all-reduced flag)."""

    patience: int
    bad: int = 0
    first: int = 0

    def check(self, step: int, step_loss: torch.Tensor, engine: Engine, world: World) -> bool:
        """Whether `step` (just taken) was non-finite; raises NonFiniteLoss at the patience-th in a row."""
        local = not bool(torch.isfinite(step_loss).all())
        if engine.loss_scale is None:  # fp16 skips overflow steps itself (the loss scaler): not ours to count
            local = local or not math.isfinite(engine.grad_norm_or_zero)
        (anywhere,) = world.all_reduce_sum([float(local)])
        if not anywhere:
            self.bad = 0
            return False
        self.bad += 1
        self.first = step if self.bad == 1 else self.first
        if self.bad >= self.patience:
            raise NonFiniteLoss(f"the loss or gradient norm was NaN or infinite for {self.bad} consecutive step(s) "
                                f"(steps {self.first}-{step})")
        return True


@dataclass(frozen=True)
class ForgettingLimit:
    """Stop at the first evaluation whose forgetting (pretrain: the general sets' relative perplexity
    increase over the starting model) exceeds `limit`."""

    limit: float

    def should_stop(self, state: TrainState, evaluation: dict[str, float]) -> bool:
        return evaluation.get("forgetting", 0.0) > self.limit


@dataclass(frozen=True)
class AnyOf:
    """Stop when any rule says so; every rule sees every evaluation (early stopping keeps count)."""

    rules: tuple[EarlyStopping | ForgettingLimit, ...]

    def should_stop(self, state: TrainState, evaluation: dict[str, float]) -> bool:
        return any([rule.should_stop(state, evaluation) for rule in self.rules])


def train_loop(*, engine: Engine, batches: Iterator[StepBatch], loss_fn: LossFn, state: TrainState,
               cadence: Cadence,
               evaluate: Callable[[], dict[str, float]], save: Callable[[int], None], log: MetricsLog,
               ledger: Ledger, world: World, flops: FlopsModel, peak_flops: float,
               throughput: Throughput, early_stopping: EarlyStopping | AnyOf | None = None,
               stop_requested: Callable[[], bool] = lambda: False,
               after_step: Callable[[int], None] = lambda step: None,
               nonfinite: NonFiniteGuard | None = None) -> TrainState:
    """Train until `cadence.max_steps` (or early stopping, or a stop request); every rank runs the
    same steps and the same collectives. With early stopping, every evaluation also saves a
    checkpoint. `stop_requested` (asked at each step's start; rank 0's answer counts) ends the
    loop when that step is done, with a checkpoint of it. `after_step` runs after each optimizer step
    (heartbeat, fault injection). `nonfinite` checks every step: a non-finite one is neither evaluated nor
    saved; enough of them in a row, or any at the end, raise NonFiniteLoss."""
    engine.train()
    losses: list[torch.Tensor] = []  # per micro batch: the loss summed over its targets
    step_losses: list[torch.Tensor] = []  # per step of the interval: this rank's loss sum (no sync until logged)
    step_targets: list[float] = []  # per step of the interval: its targets over all ranks
    targets, tokens, replaced, work, step_s, wait_s = 0, 0, 0, 0.0, 0.0, 0.0
    while state.step < cadence.max_steps and not state.stopped_early:
        t0 = time.perf_counter()
        batch = next(batches)
        t_data = time.perf_counter() - t0
        # DeepSpeed averages gradients over ranks and micro batches; this weight turns that average
        # into sum(token losses) / (targets in the global batch). The same all-reduce carries the
        # stop request, so every rank stops at the same step.
        global_targets, stop = world.all_reduce_sum([sum(batch.targets), float(world.is_main and stop_requested())])
        weight = world.world_size * len(batch.micro) / max(global_targets, 1.0)
        for micro in batch.micro:  # gradient accumulation; DeepSpeed steps at the boundary
            losses.append(engine.forward_backward(micro, loss_fn, weight))
            engine.step()
        targets += sum(batch.targets)
        step_targets.append(global_targets)
        ledger.record(state.step, batch.ids)  # plan steps count from 0
        state.step += 1
        after_step(state.step)
        tokens += batch.tokens
        # the chunked LM head runs only the positions with a target through the head
        work += flops.of(batch.tokens, batch.attention_units, sum(batch.targets) if engine.head else None)
        replaced += batch.replaced
        step_s += time.perf_counter() - t0
        wait_s += t_data

        step_losses.append(torch.stack(losses[-len(batch.micro):]).sum())
        broken = nonfinite is not None and nonfinite.check(state.step, step_losses[-1], engine, world)
        do_eval = cadence.eval_due(state.step) and not broken
        do_save = (cadence.due(state.step, cadence.save_every) or stop > 0) and not broken
        if do_eval or do_save or state.step % cadence.log_every == 0:
            # Each step's own loss rides on the interval's one all-reduce: a float per step, no extra sync.
            loss_sum, n, global_tokens, global_replaced, global_work, *step_sums = world.all_reduce_sum(
                [float(torch.stack(losses).sum()), targets, tokens, replaced, work,
                 *torch.stack(step_losses).tolist()])
            state.tokens += int(global_tokens)
            state.replaced_samples += int(global_replaced)
            state.last_loss = loss_sum / n
            throughput.add(int(global_tokens), step_s, global_work)
            tps = global_tokens / step_s
            row = {"step": state.step, "loss": state.last_loss, "lr": engine.lr, "grad_norm": engine.grad_norm,
                   "tokens": state.tokens, "tokens_per_s": tps,
                   "mfu": global_work / step_s / (peak_flops * world.world_size),
                   **memory_mb(), "data_wait_frac": wait_s / step_s,
                   "skipped_steps": engine.skipped_steps, "replaced_samples": state.replaced_samples,
                   "step_losses": [s / max(t, 1.0) for s, t in zip(step_sums, step_targets, strict=True)]}
            if engine.loss_scale is not None:
                row["loss_scale"] = engine.loss_scale
            if do_eval:
                state.last_eval, state.eval_step = evaluate(), state.step
                engine.train()
                if early_stopping is not None:
                    do_save = True
                    state.stopped_early = early_stopping.should_stop(state, state.last_eval)
                row.update({f"eval_{k}": v for k, v in state.last_eval.items() if isinstance(v, (int, float))})
            log.log(row)
            losses, step_losses, step_targets = [], [], []
            targets, tokens, replaced, work, step_s, wait_s = 0, 0, 0, 0.0, 0.0, 0.0
        if do_save:
            save(state.step)
        if stop and state.step < cadence.max_steps:
            state.preempted = True
            break
    if nonfinite is not None and nonfinite.bad:  # ended (or stopped) on fewer non-finite steps than the patience
        raise NonFiniteLoss(f"the loss or gradient norm was NaN or infinite at the last {nonfinite.bad} step(s) "
                            f"(steps {nonfinite.first}-{state.step}), which were not saved")
    return state
