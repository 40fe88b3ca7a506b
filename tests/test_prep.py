"""The preparer (kernel/prep.py): jobs run off the caller's thread, round robin across owners; queued jobs can
be cancelled one by one or by owner; a failing job reports its exception."""
from __future__ import annotations

import queue
import threading

import pytest

from kernel.prep import Preparer

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def prep():
    done: queue.Queue = queue.Queue()
    p = Preparer(lambda key, result, error: done.put((key, result, error)))
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
