"""Requests and their parameters (llama.cpp's ``server-task``): the ABI arguments of a generation, their
validation, the engine's error type and the handle a caller holds for a queued request.

Nothing here touches llama.cpp: the engine (kernel/llm/engine.py) creates requests, the scheduler
(kernel/llm/scheduler.py) orders them, the sink gets their events.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

MAX_TOKENS_LIMIT = 4096  # ABI: max_tokens is 1..4096
MAX_STOP_SEQUENCES = 8  # ABI: stop is at most 8 non-empty strings
DEFAULT_MODEL = "default"  # the name of the model a request gets when it names none
_REQUEST_IDS = itertools.count(1)  # shared by every engine: a request id names one request in the process


class EngineError(Exception):
    """An error with an ABI error code (docs/abi.md section 3): ``.code`` is e.g. ``"E2BIG"``, ``"EINVAL"``,
    ``"ECANCELED"``, ``"EIO"``, ``"ENOENT"``; ``str()`` is the message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
        self.usage: dict | None = None  # on a request's error event: what it computed before it ended

    def __repr__(self) -> str:
        return f"EngineError({self.code!r}, {self.message!r})"


@dataclass
class SamplingParams:
    """How to generate; the ABI arguments of ``llm.generate`` minus ``prompt``, ``stream`` and ``model``."""

    max_tokens: int = 128
    temperature: float = 0.0  # 0 => greedy
    top_k: int = 40  # 0 disables
    top_p: float = 0.95  # 1.0 disables
    seed: int | None = None  # None => random
    stop: list[str] = field(default_factory=list)
    json_schema: dict | None = None  # constrain the output to JSON matching this schema


def check_params(p: SamplingParams) -> None:
    """Raise ``EngineError("EINVAL")`` naming the first argument out of the ABI's range; return otherwise."""

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v):
        return (is_int(v) or isinstance(v, float)) and math.isfinite(v)

    if not is_int(p.max_tokens) or not 1 <= p.max_tokens <= MAX_TOKENS_LIMIT:
        raise EngineError("EINVAL", f"max_tokens must be an integer in 1..{MAX_TOKENS_LIMIT}, got {p.max_tokens!r}")
    if not is_num(p.temperature) or p.temperature < 0:
        raise EngineError("EINVAL", f"temperature must be a number >= 0, got {p.temperature!r}")
    if not is_int(p.top_k) or p.top_k < 0:
        raise EngineError("EINVAL", f"top_k must be an integer >= 0 (0 disables), got {p.top_k!r}")
    if not is_num(p.top_p) or not 0 < p.top_p <= 1:
        raise EngineError("EINVAL", f"top_p must be a number in (0, 1] (1 disables), got {p.top_p!r}")
    if p.seed is not None and (not is_int(p.seed) or p.seed < 0):
        raise EngineError("EINVAL", f"seed must be an integer >= 0 or nil, got {p.seed!r}")
    if not isinstance(p.stop, (list, tuple)) or len(p.stop) > MAX_STOP_SEQUENCES:
        raise EngineError("EINVAL", f"stop must be a list of at most {MAX_STOP_SEQUENCES} non-empty strings")
    for s in p.stop:
        if not isinstance(s, str) or not s:
            raise EngineError("EINVAL", f"stop must hold non-empty strings, got {s!r}")
    if p.json_schema is not None and not isinstance(p.json_schema, dict):
        raise EngineError("EINVAL", f"json_schema must be a JSON Schema object (a map) or nil, got {p.json_schema!r}")


# Request life cycle: WAITING (pending, never ran) -> RUNNING (the engine has started it: it has a sequence, which
# may be preempted or evicted meanwhile) -> DONE (the sink got done/error).
WAITING, RUNNING, DONE = "waiting", "running", "done"


class Request:
    """One generation, created by ``Engine.submit``.  The caller treats it as an opaque handle: ``id`` is unique
    in the process (across engines); ``owner``, ``tag``, ``key`` and ``priority`` are what the caller passed (``tag`` comes back
    untouched in events); ``model`` names the engine that serves it."""

    __slots__ = ("id", "owner", "tag", "key", "stream", "params", "tokens", "priority", "model", "_state",
                 "_cancelled", "_sampler", "_grammar", "_seq", "_queued_at")

    def __init__(self, id: int, tokens: list[int], params: SamplingParams, owner, tag, stream: bool,
                 priority: int = 0, key=None, model: str = DEFAULT_MODEL):
        self.id = id
        self.owner = owner
        self.tag = tag
        self.key = key
        self.stream = stream
        self.params = params
        self.tokens = tokens  # the prompt (a text prompt's BOS included)
        self.priority = priority
        self.model = model
        self._state = WAITING  # guarded by Engine._lock
        self._cancelled = False  # guarded by Engine._lock
        self._sampler = None  # C sampler chain; made by submit, freed by the engine thread when the request ends
        self._grammar = None  # C grammar sampler (json_schema), or None
        self._seq = None  # engine thread: its Seq (kernel/llm/slots.py) once started
        self._queued_at = time.monotonic()  # for the profile's time queued

    def __repr__(self) -> str:
        return f"<Request {self.id} owner={self.owner!r} {self._state} prompt={len(self.tokens)}t>"


def next_request_id() -> int:
    """A request id no other request of this process has (across engines)."""
    return next(_REQUEST_IDS)


def usage_so_far(req: Request) -> dict:
    """What a request computed before it ended in an error, to be charged like a finished one: prompt tokens
    whose KV it computed or reused (none if it never started), tokens generated, prompt tokens reused."""
    seq = req._seq
    if seq is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
    return {"prompt_tokens": min(seq.n_past, len(req.tokens)), "completion_tokens": seq.n_generated,
            "cached_tokens": seq.n_cached}


class Cancellable:
    """``cancel`` and ``cancel_key`` for a core (the local engine, a remote core) that keeps ``_lock``, its
    pending requests by submission key in ``_by_key`` and ``_cancel_locked(request) -> bool``."""

    def cancel(self, request) -> bool:
        """Cancel ``request`` if it is still pending (waiting or running) and return True; its sink then gets
        ``"error"`` ``ECANCELED`` (whatever else was under way) and the core frees what it held for it (a
        sequence, an HTTP stream).  False when it had already ended or was cancelled before."""
        with self._lock:
            return self._cancel_locked(request)

    def cancel_key(self, key) -> bool:
        """Cancel the pending request submitted with ``key``; False when there is none (it ended, or never was)."""
        with self._lock:
            req = self._by_key.get(key)
            return req is not None and self._cancel_locked(req)
