"""When a stage fails, restart it from its last committed checkpoint, unless a restart would only repeat it.

The driver runs each attempt as its own Ray Train `fit()` (Ray's own restarts are off), so it sees
every failure and decides. A worker killed (a lost node, an OOM kill, SIGKILL) or a rank stuck
leaves no error of its own: it is restarted, up to `ray.max_failures` times. A worker that raised
records its error with the step (launch/worker.py); when an attempt ends with the same error at
the same step as the attempt before it (out of memory, a bad sample under `on_bad_sample: error`,
a loss that turns non-finite), the run stops at once instead of spending the remaining restarts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dist_train.train.heartbeat import last_step, read_incidents


@dataclass(frozen=True)
class AttemptEnd:
    """How one failed attempt at a stage ended."""

    number: int  # 1 for the first attempt
    cause: str  # one line: the first worker error, the stuck rank, or Ray's own message
    step: int | None  # the step it failed at (a worker error) or the furthest any rank reached
    signature: tuple[str, str, int] | None  # (error type, message shape, step); None: no worker raised

    def line(self) -> str:
        where = f" at step {self.step}" if self.step is not None else ""
        return f"attempt {self.number} failed{where}: {self.cause}"


def attempt_end(stage_dir: Path, number: int, attempt: float, exc: BaseException) -> AttemptEnd:
    """Why attempt `number` (the driver's id `attempt`, recorded by the workers with their incidents
    and heartbeats: no clocks are compared) failed with `exc`, Ray's wrapper error."""
    incidents = [i for i in read_incidents(stage_dir) if i.get("attempt") == attempt]
    stuck = [i for i in incidents if i.get("kind") == "stuck_rank"]
    errors = [i for i in incidents if i.get("kind") == "error" and isinstance(i.get("step"), int)]
    died = worker_died(exc)
    # A rank that died or froze is the cause even when its peers then raised errors (a connection
    # closed by the dead peer); such an attempt may be restarted whatever the attempt before it did.
    if errors and not stuck and not died:
        first = errors[0]  # later errors are usually peers losing their connection to the first
        return AttemptEnd(number, str(first.get("message")), first["step"],
                          (str(first.get("error")), _shape(str(first.get("message"))), first["step"]))
    step = last_step(stage_dir, attempt)
    if stuck:
        return AttemptEnd(number, str(stuck[-1].get("message")), step, None)
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    cause = lines[-1] if lines else type(exc).__name__
    # No worker said why (a failure before the workers ran, in the controller...): the same such
    # failure twice at the same step is as hopeless as a repeated worker error.
    signature = None if died else (type(exc).__name__, _shape(cause), step if step is not None else -1)
    return AttemptEnd(number, cause, step, signature)


def _shape(message: str) -> str:
    return re.sub(r"\d+", "#", message)  # free-memory figures, ranks, pids, ports vary between attempts


def worker_died(exc: BaseException) -> bool:
    """Whether Ray saw a worker process end or go silent (killed, lost with its node) rather than raise."""
    from ray.exceptions import RayActorError

    failures = getattr(exc, "worker_failures", None)  # ray.train.WorkerGroupError: {rank: error}
    if not isinstance(failures, dict):
        return False
    for failure in failures.values():
        # Ray Train wraps what its health check saw: a dead actor, or a check that never answered
        inner = getattr(failure, "health_check_failure", failure)
        if isinstance(inner, RayActorError) or type(failure).__name__ == "WorkerHealthCheckTimeoutError":
            return True
    return False


def stop_reason(ends: list[AttemptEnd], max_failures: int) -> str | None:
    """None when another attempt may start after `ends`; otherwise why not, as a clause for the
    error line ("" when there was nothing to say: one attempt and no restarts allowed). Pure."""
    last = ends[-1]
    if len(ends) >= 2 and last.signature is not None and last.signature == ends[-2].signature:
        return (f"attempt {last.number} failed the same way at the same step as attempt {last.number - 1}, "
                "so it was not restarted again")
    if max_failures == -1 or len(ends) <= max_failures:
        return None
    return f"no restart left after {len(ends)} attempts (ray.max_failures={max_failures})" if len(ends) > 1 else ""
