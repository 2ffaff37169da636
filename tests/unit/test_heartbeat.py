"""Heartbeats: a rank that goes quiet is named within the bound; a finished one never is."""

import time

from dist_train.train.heartbeat import Heartbeat
from dist_train.world import World


def _watcher(tmp_path, timeout=0.6, attempt=1.0):
    reports: list[str] = []
    hb = Heartbeat(tmp_path, World(rank=0, world_size=2), attempt, timeout)
    hb._report = lambda rank, message: reports.append(message)  # the real one ends the process
    return hb, reports


def _wait_for(reports, seconds):
    deadline = time.monotonic() + seconds
    while not reports and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_rank_that_stops_beating_is_named_within_the_timeout(tmp_path):
    peer = Heartbeat(tmp_path, World(rank=1, world_size=2), 1.0, 0.6).start()
    peer.progress(7)
    watcher, reports = _watcher(tmp_path)
    watcher.start()
    time.sleep(1.5)  # well past the 0.6 s timeout: a watcher that ignored the beats would have reported by now
    assert not reports, "a beating rank is not reported"
    peer._stop.set()  # frozen: the thread stops, without the final "done" beat
    peer._thread.join()
    t0 = time.monotonic()
    _wait_for(reports, 3)
    watcher.stop()
    assert reports and time.monotonic() - t0 < 0.6 + 2 * watcher.interval
    assert reports[0].startswith("rank 1 is not responding: no heartbeat for")
    assert "last seen in train at step 7" in reports[0]


def test_finished_ranks_and_beats_of_an_earlier_attempt(tmp_path):
    old = Heartbeat(tmp_path, World(rank=1, world_size=2), 0.5, 0.6).start()  # an earlier attempt
    old._stop.set()
    old._thread.join()
    watcher, reports = _watcher(tmp_path)
    watcher.start()
    _wait_for(reports, 3)
    assert reports and "never sent a heartbeat in this attempt" in reports[0]

    watcher2, reports2 = _watcher(tmp_path, attempt=2.0)
    done = Heartbeat(tmp_path, World(rank=1, world_size=2), 2.0, 0.6).start()
    watcher2.start()
    done.stop()  # finished its stage: says "done"
    time.sleep(1.5)
    watcher2.stop()
    assert not reports2
