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


def attempt_end(stage_dir: Path, number: int, since: float, exc: BaseException) -> AttemptEnd:
    """Why attempt `number`, started at unix time `since`, failed with `exc` (Ray's wrapper error)."""
    incidents = read_incidents(stage_dir, since=since)
    stuck = [i for i in incidents if i.get("kind") == "stuck_rank"]
    errors = [i for i in incidents if i.get("kind") == "error" and isinstance(i.get("step"), int)]
    # A rank that died or froze is the cause even when its peers then raised errors (a connection
    # closed by the dead peer); such an attempt may be restarted whatever the attempt before it did.
    if errors and not stuck and not worker_died(exc):
        first = errors[0]  # later errors are usually peers losing their connection to the first
        shape = re.sub(r"\d+", "#", str(first.get("message", "")))  # free-memory figures, ranks, pids vary
        return AttemptEnd(number, str(first.get("message")), first["step"],
                          (str(first.get("error")), shape, first["step"]))
    if stuck:
        cause = str(stuck[-1].get("message"))
    else:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        cause = lines[-1] if lines else type(exc).__name__
    return AttemptEnd(number, cause, last_step(stage_dir, since), None)


def worker_died(exc: BaseException) -> bool:
    """Whether Ray saw a worker process end (killed, lost with its node) rather than raise."""
    from ray.exceptions import RayActorError

    failures = getattr(exc, "worker_failures", None)  # ray.train.WorkerGroupError: {rank: error}
    return isinstance(failures, dict) and any(isinstance(f, RayActorError) for f in failures.values())


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
