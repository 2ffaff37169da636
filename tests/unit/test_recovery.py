"""Restarts on by default, without retrying the hopeless: how the driver reads a failed attempt and
decides whether to start another. (A real run that stops after a repeated error is in
tests/integration/test_data_ray.py; real SIGKILLs that are restarted, in test_faults.py.)"""

from __future__ import annotations

import json

from ray.exceptions import ActorDiedError
from ray.train import WorkerGroupError

from dist_train.config.schema import RayConfig
from dist_train.launch.recovery import AttemptEnd, attempt_end, stop_reason
from dist_train.train.heartbeat import record_incident


def end(number: int, step: int | None, signature: tuple | None) -> AttemptEnd:
    return AttemptEnd(number, "why", step, signature)


def test_restarts_are_on_by_default():
    assert RayConfig().max_failures == 3


def test_a_repeated_error_at_the_same_step_stops_at_once():
    oom = ("OutOfMemoryError", "rank #: CUDA out of memory", 40)
    assert stop_reason([end(1, 40, oom)], 3) is None  # the first failure is always worth a restart
    reason = stop_reason([end(1, 40, oom), end(2, 40, oom)], 3)
    assert reason == "attempt 2 failed the same way at the same step as attempt 1, so it was not restarted again"
    # the same error at another step, or another error at the same step: restart
    assert stop_reason([end(1, 40, oom), end(2, 41, (*oom[:2], 41))], 3) is None
    assert stop_reason([end(1, 40, oom), end(2, 40, ("DataError", "bad shard", 40))], 3) is None
    # a worker that died twice at the same step (no error of its own) is restarted again
    assert stop_reason([end(1, 40, None), end(2, 40, None)], 3) is None


def test_the_restart_budget():
    fails = [end(i, 10 * i, None) for i in range(1, 5)]
    assert stop_reason(fails[:3], 3) is None
    assert stop_reason(fails, 3) == "no restart left after 4 attempts (ray.max_failures=3)"
    assert stop_reason(fails[:1], 0) == ""  # restarts off: the error line needs no explanation
    assert stop_reason(fails, -1) is None


def test_an_attempt_ends_with_its_first_worker_error(tmp_path):
    first_id, second_id = 1000.5, 1060.25  # the driver's ids of two starts; the workers' clocks do not matter
    record_incident(tmp_path, "error", "rank 1: CUDA out of memory. Tried to allocate 2.00 GiB (3.1 GiB free)",
                    rank=1, step=40, phase="train", attempt=first_id, error="OutOfMemoryError")
    record_incident(tmp_path, "error", "rank 0: Connection closed by peer", rank=0, step=40, phase="train",
                    attempt=first_id, error="RuntimeError")
    first = attempt_end(tmp_path, 1, first_id, RuntimeError("ray's wrapper"))
    assert first.line() == "attempt 1 failed at step 40: rank 1: CUDA out of memory. Tried to allocate 2.00 GiB " \
                           "(3.1 GiB free)"
    record_incident(tmp_path, "error", "rank 1: CUDA out of memory. Tried to allocate 2.00 GiB (2.9 GiB free)",
                    rank=1, step=40, phase="train", attempt=second_id, error="OutOfMemoryError")
    second = attempt_end(tmp_path, 2, second_id, RuntimeError("ray's wrapper"))
    assert second.cause.endswith("(2.9 GiB free)"), "only this attempt's incidents count"
    assert second.signature == first.signature  # the free-memory figure differs; the failure is the same
    assert stop_reason([first, second], 3)


def died_in_ray(rank: int) -> WorkerGroupError:
    """The error Ray Train 2.60 raises when a worker process is killed: its health check failed on a dead actor."""
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    return WorkerGroupError("Training failed due to worker errors:\nrank 1 died",
                            {rank: WorkerHealthCheckFailedError("health check failed", ActorDiedError())})


def test_a_dead_or_stuck_worker_is_not_an_error_of_the_run(tmp_path):
    attempt = 77.0
    (tmp_path / "heartbeat").mkdir()
    for rank, step in ((0, 7), (1, 6)):
        (tmp_path / "heartbeat" / f"rank_{rank:05d}.json").write_text(json.dumps({"attempt": attempt, "step": step}))
    # the peer of a killed rank raised on its broken connection: the death, not that error, ended the attempt
    record_incident(tmp_path, "error", "rank 0: Connection reset by peer", rank=0, step=7, phase="train",
                    attempt=attempt, error="RuntimeError")
    ended = attempt_end(tmp_path, 1, attempt, died_in_ray(1))
    assert ended.signature is None and ended.step == 7 and ended.cause == "rank 1 died"
    assert stop_reason([ended, attempt_end(tmp_path, 2, attempt, died_in_ray(1))], 3) is None
    record_incident(tmp_path, "stuck_rank", "rank 1 is not responding: no heartbeat for 121 s", attempt=attempt)
    ended = attempt_end(tmp_path, 2, attempt, RuntimeError("x"))
    assert ended.signature is None and ended.cause.startswith("rank 1 is not responding")


def test_a_failure_no_worker_explains_is_not_retried_forever(tmp_path):
    """Say the workers cannot even start (an output_dir they cannot write): no incident, the same error twice."""
    ends = [attempt_end(tmp_path, n, float(n), RuntimeError("controller: cannot write /shared/out (errno 13)"))
            for n in (1, 2)]
    assert ends[0].signature is not None and stop_reason(ends, -1)
