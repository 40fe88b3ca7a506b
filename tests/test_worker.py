"""The worker (kernel/worker.py): jobs run off the caller's thread, round robin across owners; queued jobs can
be cancelled one by one or by owner; a failing job reports its exception."""
from __future__ import annotations

import queue
import threading

import pytest

from kernel.worker import Worker

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def prep():
    done: queue.Queue = queue.Queue()
    p = Worker(lambda key, result, error: done.put((key, result, error)))
    p.done = done
    yield p
    p.close()


def test_owners_are_served_round_robin(prep):
    gate, order = threading.Event(), []
    prep.submit("hog", "block", gate.wait)  # holds the worker while the queue fills
    for i in range(5):
        prep.submit("hog", f"hog{i}", lambda i=i: order.append(f"hog{i}"))
    prep.submit("quiet", "quiet0", lambda: order.append("quiet0"))
    gate.set()
    keys = [prep.done.get(timeout=10)[0] for _ in range(7)]
    assert keys[0] == "block"
    assert keys.index("quiet0") <= 2, keys  # behind at most one of the hog's jobs, not all five


def test_queued_jobs_are_cancelled_by_key_and_by_owner(prep):
    gate = threading.Event()
    prep.submit("a", "block", gate.wait)
    prep.submit("a", "a1", lambda: "a1")
    prep.submit("b", "b1", lambda: "b1")
    prep.submit("b", "b2", lambda: "b2")
    prep.submit("c", "c1", lambda: "c1")
    assert prep.cancel("a1") and not prep.cancel("a1") and not prep.cancel("nothing")
    assert sorted(prep.drop_owner("b")) == ["b1", "b2"]
    assert not prep.cancel("b1")
    gate.set()
    got = [prep.done.get(timeout=10)[0] for _ in range(2)]
    assert got == ["block", "c1"]
    assert prep.done.empty()


def test_a_failing_job_reports_its_exception_and_the_worker_goes_on(prep):
    prep.submit(None, "bad", lambda: 1 / 0)
    prep.submit(None, "good", lambda: 42)
    key, result, error = prep.done.get(timeout=10)
    assert key == "bad" and isinstance(error, ZeroDivisionError)
    assert prep.done.get(timeout=10) == ("good", 42, None)


def test_a_grouped_worker_hands_the_queued_jobs_over_together():
    done: queue.Queue = queue.Queue()
    groups = []

    def group(jobs):
        groups.append(len(jobs))
        return [(job(), None) for job in jobs]

    w = Worker(lambda key, result, error: done.put((key, result, error)), group=group, group_max=3)
    try:
        gate, started = threading.Event(), threading.Event()
        w.submit("a", "block", lambda: (started.set(), gate.wait()))
        assert started.wait(10)
        for i in range(5):
            w.submit("bc"[i % 2], f"j{i}", lambda i=i: i)
        gate.set()
        got = [done.get(timeout=10) for _ in range(6)]
        assert [g for g in groups] == [1, 3, 2]  # the blocker alone, then what had queued, three at most
        assert {key: result for key, result, _ in got}["j4"] == 4
    finally:
        w.close()
