"""The training loop: the whole step sequence of both stages, readable top to bottom.

forward/backward over the accumulation micro batches -> (DeepSpeed: clip, step, schedule)
-> log -> eval -> checkpoint. Everything it uses is built before and passed in. The loss is
token-weighted: every predicted token of the global batch counts once, however padding or
masking falls across micro batches and ranks (one small all-reduce of target counts per step, none
where every rank's count is known in advance: a causal LM on packed rows). The loss value itself is
read from the device only at log, eval and save steps; the ranks agree on a stop request and on
non-finite steps at checks (every log, eval and save step, and every few seconds between them),
not at every step, so a fast step never waits for the host.
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
    # every rank's micro batches have these same target counts this step (a causal LM on packed rows): the
    # global count is world_size × this rank's, and the step needs no all-reduce to weight its loss
    uniform_targets: bool = False


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


# Between log, eval and save steps, the ranks check for a stop request and non-finite steps about this often (one
# all-reduce); a stop request waits at most this long plus a step.
CHECK_EVERY_S = 5.0


class NonFiniteLoss(RuntimeError):
    """The loss (or gradient norm) was not finite for `patience` consecutive steps."""


@dataclass
class NonFiniteGuard:
    """Counts consecutive steps whose loss (or, outside fp16, gradient norm) was NaN or infinite on any rank,
    and stops the run at `patience` of them. Each step's flag stays on the device (`note`) until the loop's
    next check all-reduces the flags of the steps since the last one (`flags`, then `update`): every rank
    sees the same count, and the run stops at the first check after the patience-th step in a row."""

    patience: int
    bad: int = 0
    first: int = 0
    pending: list[tuple[int, torch.Tensor, bool]] = field(default_factory=list)  # (step, loss flag, norm flag)

    def note(self, step: int, step_loss: torch.Tensor, engine: Engine) -> None:
        """Record `step` (just taken) without reading the loss from the device."""
        flag = ~torch.isfinite(step_loss).all()
        # fp16 skips overflow steps itself (the loss scaler): its gradient norm is not ours to count
        norm = engine.grad_norm_held if engine.loss_scale is None else None
        if isinstance(norm, torch.Tensor):  # on the device: combined there, read at the check
            flag = flag | ~torch.isfinite(norm.to(flag.device)).all()
        self.pending.append((step, flag, isinstance(norm, float) and not math.isfinite(norm)))

    def flags(self) -> list[float]:
        """This rank's flag (1.0: non-finite) for each step noted since the last update; one device read."""
        if not self.pending:
            return []
        losses = torch.stack([flag for _, flag, _ in self.pending]).tolist()
        return [float(bool(lost) or norm) for lost, (_, _, norm) in zip(losses, self.pending, strict=True)]

    def update(self, anywhere: list[float]) -> bool:
        """Take the all-reduced flags of the pending steps, in order; whether the last was non-finite.
        Raises NonFiniteLoss once `patience` steps in a row were."""
        steps = [step for step, _, _ in self.pending]
        self.pending = []
        for step, bad in zip(steps, anywhere, strict=True):
            self.bad = self.bad + 1 if bad else 0
            self.first = step if self.bad == 1 else self.first
        if self.bad >= self.patience:
            raise NonFiniteLoss(f"the loss or gradient norm was NaN or infinite for {self.bad} consecutive step(s) "
                                f"(steps {self.first}-{steps[-1]})")
        return bool(steps) and self.bad > 0


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
    checkpoint. `stop_requested` (rank 0's answer counts) is asked at each check (every log, eval
    and save step, and about every CHECK_EVERY_S seconds between them) and ends the loop with a
    checkpoint of the step just taken. `after_step` runs after each optimizer step (heartbeat, fault
    injection). `nonfinite` sees every step and decides at the checks: a non-finite step is neither
    evaluated nor saved; enough of them in a row, or any at the end, raise NonFiniteLoss."""
    engine.train()
    losses: list[torch.Tensor] = []  # per micro batch: the loss summed over its targets
    step_losses: list[torch.Tensor] = []  # per step of the interval: this rank's loss sum (no sync until logged)
    step_targets: list[float] = []  # per step of the interval: its targets over all ranks
    targets, tokens, replaced, work, step_s, wait_s = 0, 0, 0, 0.0, 0.0, 0.0
    next_check, checked_at, since_check = state.step + 1, time.perf_counter(), 0
    while state.step < cadence.max_steps and not state.stopped_early:
        t0 = time.perf_counter()
        batch = next(batches)
        t_data = time.perf_counter() - t0
        # DeepSpeed averages gradients over ranks and micro batches; this weight turns that average
        # into sum(token losses) / (targets in the global batch).
        if batch.uniform_targets:
            global_targets = float(sum(batch.targets) * world.world_size)
        else:
            (global_targets,) = world.all_reduce_sum([sum(batch.targets)])
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
        if nonfinite is not None:
            nonfinite.note(state.step, step_losses[-1], engine)
        do_log = state.step % cadence.log_every == 0
        do_eval = cadence.eval_due(state.step)
        do_save = cadence.due(state.step, cadence.save_every)
        stop, broken, since_check = 0.0, False, since_check + 1
        if do_log or do_eval or do_save or state.step >= next_check:
            # One all-reduce: rank 0's stop request and the steps until the next check (rank 0 times them, so
            # every rank agrees), and each rank's non-finite flags of the steps since the last check.
            now = time.perf_counter()
            elapsed, checked_at = now - checked_at, now
            every = max(1, min(1000, round(CHECK_EVERY_S * since_check / max(elapsed, 1e-6))))
            stop, every_all, *bad = world.all_reduce_sum(
                [float(world.is_main and stop_requested()), float(every) if world.is_main else 0.0,
                 *(nonfinite.flags() if nonfinite is not None else [])])
            next_check, since_check = state.step + int(every_all), 0
            broken = nonfinite is not None and nonfinite.update(bad)
        do_eval = do_eval and not broken
        do_save = (do_save or stop > 0) and not broken
        if do_eval or do_save or do_log:
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
