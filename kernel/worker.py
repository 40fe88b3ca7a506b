"""Work the kernel does for agents off its event loop: one thread per ``Worker``, jobs round robin across owners.

Some syscalls cost what the agent chose to send.  Preparing a generation (kernel.py's preparer: chat rendering,
tokenizing, grammar building) takes ~1 s for a 1 MiB prompt; a storage write waits for an fsync; a memory search
embeds its query.  Done on the kernel's event loop, that time would stall every agent's syscalls; done on the
engine thread, every running generation.  So the kernel hands each such job to a worker: one thread (with a
stack of a chosen size: the preparer's is ``PREP_STACK_BYTES``, so that the depth llama.cpp's recursive grammar
parser may reach is known, not whatever the main thread has left), serving owners round robin -- an agent's job
waits behind at most one job of each other agent, however many it has queued itself (the kernel bounds that
number per agent).  One thread per worker also makes it the one writer of what it owns (storage's SQLite).

Data flow, one way::

    event loop  submit(owner, key, job)       -> queued under its owner
    worker      job()                          -> a result, or the exception it raised
    worker      done(key, result, error)       -> the kernel's event deque; the event loop finishes it there

``job`` and ``done`` are the kernel's; this module only queues, orders and runs.  ``cancel`` and
``drop_owner`` remove jobs that have not started (the caller answers them); a job already running finishes and
its ``done`` still comes, so the caller must check there whether it is still wanted.
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)

PREP_STACK_BYTES = 256 << 20  # the preparer's stack: ample for the nesting kernel/llm/grammar.py lets through


class Worker:
    """One thread running jobs round robin across owners."""

    def __init__(self, done: Callable[[object, object, BaseException | None], None], *, name: str = "aiosd-worker",
                 stack_bytes: int = 0, group: Callable[[list], list] | None = None, group_max: int = 64):
        """``done(key, result, error)`` is called from the worker after each job (exactly one of result and
        error is meaningful); it must be cheap and must not raise.  ``stack_bytes``: the thread's stack (0: the
        platform's default).

        ``group(jobs) -> [(result, error), ...]``, if given, runs the jobs queued at one moment (up to
        ``group_max``, still round robin across owners) together -- the storage manager commits them in one
        transaction, one fsync for all (group commit) -- and ``done`` comes for each only after it returns."""
        self._done = done
        self._group, self._group_max = group, group_max
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queues: collections.OrderedDict[object, collections.deque] = collections.OrderedDict()
        self._owner_of: dict[object, object] = {}  # key -> owner, for jobs not started
        self._closed = False
        old = threading.stack_size()
        threading.stack_size(stack_bytes)
        try:
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()
        finally:
            threading.stack_size(old)

    def submit(self, owner, key, job: Callable[[], object]) -> None:
        """Queue ``job`` for ``owner`` under ``key`` (unique among queued jobs)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker is closed")
            self._queues.setdefault(owner, collections.deque()).append((key, job))
            self._owner_of[key] = owner
            self._wake.notify()

    def cancel(self, key) -> bool:
        """Remove the job queued under ``key``; True if it had not started."""
        with self._lock:
            if key not in self._owner_of:
                return False
            owner = self._owner_of.pop(key)
            queue = self._queues[owner]
            for item in queue:
                if item[0] == key:
                    queue.remove(item)
                    break
            if not queue:
                del self._queues[owner]
            return True

    def drop_owner(self, owner) -> list:
        """Remove every job of ``owner`` that has not started; their keys."""
        with self._lock:
            queue = self._queues.pop(owner, ())
            keys = [key for key, _ in queue]
            for key in keys:
                self._owner_of.pop(key, None)
            return keys

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking jobs, drop the queued ones (their ``done`` never comes) and wait for the running one."""
        with self._lock:
            self._closed = True
            self._queues.clear()
            self._owner_of.clear()
            self._wake.notify()
        self._thread.join(timeout)

    def _next(self, n: int = 1) -> list:
        """Up to ``n`` queued jobs ``[(key, job)]``, round robin across owners (waits for one); [] once closed."""
        with self._lock:
            while not self._queues and not self._closed:
                self._wake.wait()
            jobs = []
            while self._queues and not self._closed and len(jobs) < n:
                owner, queue = next(iter(self._queues.items()))
                key, job = queue.popleft()
                self._owner_of.pop(key, None)
                if queue:
                    self._queues.move_to_end(owner)  # the owner's next job waits for everyone else's
                else:
                    del self._queues[owner]
                jobs.append((key, job))
            return jobs

    def _run(self) -> None:
        while items := self._next(self._group_max if self._group else 1):
            if self._group is None:
                outcomes = [_outcome(items[0][1])]
            else:
                try:
                    outcomes = self._group([job for _, job in items])
                except BaseException as exc:  # the group as a whole failed (its commit): every job did
                    outcomes = [(None, exc)] * len(items)
            for (key, _), (result, error) in zip(items, outcomes):
                try:
                    self._done(key, result, error)
                except Exception:
                    log.exception("%s: done callback failed", self._thread.name)


def _outcome(job) -> tuple:
    """``(job(), None)``, or ``(None, the exception it raised)``: a job's failure is its caller's to answer."""
    try:
        return job(), None
    except BaseException as exc:
        return None, exc
