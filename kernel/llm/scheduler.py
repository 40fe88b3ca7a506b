"""The scheduler: which generations the LLM engine runs in its next step.  Policy only; the mechanism (slots,
batches, eviction) is ``kernel/llm/engine.py`` and ``kernel/llm/slots.py``.

Every step the engine asks its scheduler ``order(n, running, unfinished)``, which is the policy's
``pick(n, running)``: up to ``n`` (the active batch cap, ``[llm]
max_active``) of the pending requests, best first.  A request in the answer runs this step (the engine makes
it resident first, restoring or prefilling its KV); a pending request left out is *preempted*: it keeps its
state and waits.  Two decisions the engine used to make itself are the scheduler's too: the *minimum quantum*
(``order``: a request made resident keeps its place until it has sampled a token) and *shedding* (``shed``:
which sequence sits a step out when the step's new tokens do not fit the KV pool).  After the step the engine reports the service each request got, in tokens computed
(prompt tokens processed plus tokens generated), through ``charge``.

Three schedulers (policies), chosen by ``[llm] scheduler``:

- ``fifo``: first come, first served.  Arrival order never changes, so a running request is never preempted;
  a short request waits behind long ones once the batch is full.
- ``rr``: round robin with a time slice of ``rr_slice`` tokens: a request that has used its slice goes to the
  back of the queue (only matters when more requests are pending than the batch holds).
- ``fair``: least attained service per *owner* (an agent), as Autellix's PLAS and FastServe's skip-join MLFQ:
  the request whose owner has been served least runs first, so a short request from a quiet agent overtakes the
  long generations of busy ones.  An owner's service is divided by its weight ``2 ** (priority / 5)`` (the
  privilege group's priority: admin 10 -> 4x, trusted 5 -> 2x, default 0 -> 1x, untrusted -5 -> 0.5x), decays
  with a half-life of ``fair_halflife_s`` seconds (so no waiting owner starves: its rivals keep accumulating
  service while its own decays), and a running request keeps its place against a challenger until the
  challenger's service is ``rr_slice`` tokens lower (so two owners do not swap places every token).

Schedulers are called under the engine's lock, from submitting threads (``add``) and the engine thread (the
rest); they need no locking of their own.  ``req`` objects are ``kernel.llm.request.Request``; a scheduler reads only
``req.id`` (arrival order), ``req.owner`` and ``req.priority``.
"""
from __future__ import annotations

import time
from collections import deque

SCHEDULERS = ("fifo", "rr", "fair")
DEFAULT_RR_SLICE = 32
DEFAULT_HALFLIFE_S = 60.0


class Scheduler:
    """The interface every scheduler implements.  ``len(scheduler)`` is the number of pending requests it holds.
    Subclasses implement ``add``, ``remove``, ``pick``, ``charge`` and ``__len__``; ``order`` and ``shed`` are the
    decisions every policy shares."""

    name = "?"

    def add(self, req) -> None:
        """A request is pending (it stays in the scheduler until ``remove``)."""
        raise NotImplementedError

    def remove(self, req) -> None:
        """A request ended (completed, failed or cancelled)."""
        raise NotImplementedError

    def pick(self, n: int, running: set) -> list:
        """Up to ``n`` pending requests to run in the next step, best first.  ``running`` holds the requests
        that ran in the last step."""
        raise NotImplementedError

    def charge(self, req, tokens: int) -> None:
        """``req`` was served ``tokens`` tokens in the step just done."""

    def __len__(self) -> int:
        raise NotImplementedError

    def order(self, n: int, running: set, unfinished: list) -> list:
        """Up to ``n`` requests to run in the next step, best first: the policy's ``pick(n, running)``, except
        that the requests in ``unfinished`` -- made resident, not yet sampled a token -- come first, in arrival
        order.  A minimum quantum, whatever the policy says: a preemption must never undo a prefill before it
        bore fruit (a text eviction would recompute it, again and again)."""
        chosen = self.pick(n, running)
        if not unfinished:
            return chosen
        first = sorted(unfinished, key=lambda r: r.id)
        keep = set(first)
        return (first + [r for r in chosen if r not in keep])[:n]

    def shed(self, plan: list) -> int:
        """The index in ``plan`` (this step's sequences, best first) of the one to leave out of the step when
        its new tokens do not fit the KV pool and nothing else can be evicted: the least preferred.  It stays
        resident (preempted), so it becomes evictable for the next try."""
        return len(plan) - 1


class FifoScheduler(Scheduler):
    """First come, first served: the ``n`` oldest pending requests run."""

    name = "fifo"

    def __init__(self):
        self._queue: dict[int, object] = {}  # by id; dicts keep insertion (= arrival) order

    def add(self, req) -> None:
        self._queue[req.id] = req

    def remove(self, req) -> None:
        self._queue.pop(req.id, None)

    def pick(self, n: int, running: set) -> list:
        out = []
        for req in self._queue.values():
            if len(out) == n:
                break
            out.append(req)
        return out

    def __len__(self) -> int:
        return len(self._queue)


class RoundRobinScheduler(Scheduler):
    """Round robin: the first ``n`` of a queue run; one that has used ``slice_tokens`` goes to the back."""

    name = "rr"

    def __init__(self, slice_tokens: int = DEFAULT_RR_SLICE):
        if slice_tokens < 1:
            raise ValueError(f"rr_slice must be at least 1 token, got {slice_tokens}")
        self.slice = slice_tokens
        self._queue: deque = deque()
        self._used: dict[int, int] = {}

    def add(self, req) -> None:
        self._queue.append(req)
        self._used[req.id] = 0

    def remove(self, req) -> None:
        if self._used.pop(req.id, None) is not None:
            self._queue.remove(req)

    def pick(self, n: int, running: set) -> list:
        return [self._queue[i] for i in range(min(n, len(self._queue)))]

    def charge(self, req, tokens: int) -> None:
        if req.id not in self._used:
            return
        self._used[req.id] += tokens
        if self._used[req.id] >= self.slice:
            self._used[req.id] = 0
            self._queue.remove(req)
            self._queue.append(req)

    def __len__(self) -> int:
        return len(self._queue)


def priority_weight(priority: int) -> float:
    """How much more service an owner of ``priority`` may attain before yielding: ``2 ** (priority / 5)``."""
    return 2.0 ** (max(-50, min(50, priority)) / 5.0)


class FairScheduler(Scheduler):
    """Least attained service per owner, weighted by priority, decayed over time, with a hysteresis of one
    slice for running requests (see the module docstring)."""

    name = "fair"

    def __init__(self, slice_tokens: int = DEFAULT_RR_SLICE, halflife_s: float = DEFAULT_HALFLIFE_S,
                 clock=time.monotonic):
        if slice_tokens < 1:
            raise ValueError(f"rr_slice must be at least 1 token, got {slice_tokens}")
        if halflife_s <= 0:
            raise ValueError(f"fair_halflife_s must be > 0, got {halflife_s}")
        self.slice = slice_tokens
        self.halflife = halflife_s
        self._clock = clock
        self._reqs: dict[int, object] = {}  # pending, by id (arrival order)
        self._service: dict[object, list] = {}  # owner -> [tokens (decayed), as of time, pending count]

    def _decayed(self, entry: list, now: float) -> float:
        if now > entry[1]:
            entry[0] *= 0.5 ** ((now - entry[1]) / self.halflife)
            entry[1] = now
        return entry[0]

    def add(self, req) -> None:
        self._reqs[req.id] = req
        entry = self._service.setdefault(req.owner, [0.0, self._clock(), 0])
        entry[2] += 1

    def remove(self, req) -> None:
        if self._reqs.pop(req.id, None) is None:
            return
        entry = self._service[req.owner]
        entry[2] -= 1
        # An owner with nothing pending and (almost) no service left is forgotten.
        if entry[2] == 0 and self._decayed(entry, self._clock()) < 1.0:
            del self._service[req.owner]

    def service(self, owner) -> float:
        """The owner's attained service now (decayed tokens, not weighted); 0 for an unknown owner."""
        entry = self._service.get(owner)
        return self._decayed(entry, self._clock()) if entry else 0.0

    def pick(self, n: int, running: set) -> list:
        now = self._clock()
        keys = {}
        for owner, entry in self._service.items():
            self._decayed(entry, now)
        for req in self._reqs.values():
            key = self._service[req.owner][0] / priority_weight(req.priority)
            if req in running:
                key -= self.slice  # a challenger must be a whole slice behind to take its place
            keys[req.id] = key
        ranked = sorted(self._reqs.values(), key=lambda r: (keys[r.id], r.id))
        return ranked[:n]

    def charge(self, req, tokens: int) -> None:
        entry = self._service.get(req.owner)
        if entry is not None and req.id in self._reqs:
            self._decayed(entry, self._clock())
            entry[0] += tokens

    def __len__(self) -> int:
        return len(self._reqs)


def make_scheduler(name: str, *, rr_slice: int = DEFAULT_RR_SLICE,
                   halflife_s: float = DEFAULT_HALFLIFE_S) -> Scheduler:
    """The scheduler called ``name`` (``fifo``, ``rr``, ``fair``); ValueError naming the choices otherwise."""
    if name == "fifo":
        return FifoScheduler()
    if name == "rr":
        return RoundRobinScheduler(rr_slice)
    if name == "fair":
        return FairScheduler(rr_slice, halflife_s)
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
