"""The tool manager: tools run outside the kernel, in sandboxed worker processes, arguments validated before
they run, instances and queues bounded per tool (docs/abi.md, "Tools"; docs/tools.md).

A worker is an agent process of the internal group ``tool`` running ``agentproc/toolworker.py`` for one tool,
under the tool's limits (memory, CPU) and the agent sandbox; it asks for work with ``tool.next`` and answers
with ``tool.done``.  Per tool, at most ``instances`` workers exist, started when the tool is first called and
kept warm; calls wait FIFO in the tool's queue (``EAGAIN`` past ``queue``), never behind a global lock.  A call
whose worker dies fails with ``ETOOL`` (saying how it died), one that runs past ``timeout_s`` with
``ETIMEDOUT`` (the worker is killed); either way a fresh worker takes its place.  Tools that run a caller's
code (``python``) serve one call per worker: nothing one caller leaves in a worker reaches the next.

Flow, one way::

    agent  tool.call(name, args)  -> validate (jsonschema) -> queue -> an idle worker's tool.next is answered
    worker tool.done(job, result)  -> the caller's call is answered; the worker asks for the next job
"""
from __future__ import annotations

import collections
import itertools
import logging
import time
from dataclasses import dataclass, field

import jsonschema

from syscalls.errors import EAGAIN, EINVAL, ENOENT, EPERM

log = logging.getLogger("aiosd.tools")

TOOL_GROUP = "tool"  # the internal privilege group of workers (kernel/config.py)
RESPAWN_PAUSE_S = 1.0  # a tool whose workers keep dying is restarted at most this often


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict          # JSON Schema of the arguments
    instances: int = 2        # workers at most: calls run at most this many at once
    timeout_s: float = 10.0   # wall time of one call
    memory_mb: int = 256      # each worker's memory limit
    cpu_seconds: int = 60     # each worker's CPU limit (over its life)
    queue: int = 64           # calls waiting beyond the running ones (EAGAIN past it)
    once: bool = False        # a worker serves one call, then exits (tools that run the caller's code)
    acts_for_caller: bool = False  # while on a call, its storage syscalls use the caller's rights (sys_storage)

    def record(self) -> dict:
        return {"name": self.name, "description": self.description, "parameters": self.parameters,
                "limits": {"instances": self.instances, "timeout_s": self.timeout_s, "memory_mb": self.memory_mb,
                           "queue": self.queue}}


BUILTIN_TOOLS = {t.name: t for t in (
    Tool("calculator", "Evaluate an arithmetic expression: numbers, + - * / // % **, parentheses, sqrt, log, "
         "exp, sin, cos, tan, abs, round, min, max, floor, ceil, pi, e.",
         {"type": "object", "properties": {"expression": {"type": "string", "minLength": 1, "maxLength": 1000}},
          "required": ["expression"], "additionalProperties": False}),
    Tool("text", "Text utilities: count words/lines/characters, upper, lower, replace, find a regular expression.",
         {"type": "object", "properties": {
             "op": {"enum": ["count", "upper", "lower", "replace", "find"]},
             "text": {"type": "string", "maxLength": 100_000},
             "pattern": {"type": "string", "maxLength": 1000}, "replacement": {"type": "string", "maxLength": 1000}},
          "required": ["op", "text"], "additionalProperties": False}, instances=1),
    Tool("clock", "The current time: unix seconds and ISO 8601 at a UTC offset in minutes.",
         {"type": "object", "properties": {"utc_offset_minutes": {"type": "integer", "minimum": -840,
                                                                   "maximum": 840}},
          "additionalProperties": False}, instances=1),
    Tool("storage", "Read, write or list the calling agent's own storage (with the caller's rights: its namespace, "
         "its grants, its quotas).",
         {"type": "object", "properties": {
             "op": {"enum": ["read", "write", "list"]}, "key": {"type": "string", "minLength": 1, "maxLength": 1024},
             "data": {"type": "string", "maxLength": 100_000}, "prefix": {"type": "string", "maxLength": 1024}},
          "required": ["op"], "additionalProperties": False,
          "allOf": [{"if": {"properties": {"op": {"enum": ["read", "write"]}}}, "then": {"required": ["key"]}},
                    {"if": {"properties": {"op": {"const": "write"}}}, "then": {"required": ["data"]}}]},
         instances=2, acts_for_caller=True),
    Tool("python", "Run Python code in a sandbox (no network, no subprocesses, its own scratch dir, memory and "
         "time limits); returns stdout, stderr and the value of the last expression.",
         {"type": "object", "properties": {"code": {"type": "string", "minLength": 1, "maxLength": 100_000}},
          "required": ["code"], "additionalProperties": False},
         instances=2, timeout_s=10.0, memory_mb=512, once=True),
)}


@dataclass(eq=False)
class Job:
    id: int
    tool: Tool
    args: dict
    call: object           # the caller's kernel.router.Call
    queued_at: float
    started_at: float = 0.0
    worker: object = None  # the Proc running it


@dataclass(eq=False)
class _State:
    """One tool's workers and queue."""
    tool: Tool
    queue: collections.deque = field(default_factory=collections.deque)   # Jobs waiting
    idle: collections.deque = field(default_factory=collections.deque)    # (worker Proc, its tool.next Call)
    workers: set = field(default_factory=set)                             # live worker Procs
    starting: int = 0
    last_death: float = 0.0
    calls: int = 0


class ToolManager:
    """The tools of one kernel.  ``spawn(tool)`` starts a worker process for ``tool`` and returns its Proc; the
    kernel gives it (kernel.py ``_spawn_tool_worker``) and tells the manager when a worker ends."""

    def __init__(self, tools: dict[str, Tool], spawn, kill):
        self.tools = tools
        self._spawn, self._kill = spawn, kill
        self._state = {name: _State(t) for name, t in tools.items()}
        self._jobs: dict[int, Job] = {}       # running, by id
        self._by_worker: dict[int, Job] = {}  # worker proc id -> its running job
        self._worker_tool: dict[int, str] = {}
        self._ids = itertools.count(1)

    # ---- agents --------------------------------------------------------------------------------------

    def list(self) -> list[dict]:
        return [t.record() for t in self.tools.values()]

    def call(self, call, name: str, args: dict) -> None:
        """Queue a call of tool ``name``; its answer comes through ``call``.  ENOENT (no such tool), EINVAL
        (arguments: the path of the offending field), EAGAIN (the tool's queue is full)."""
        state = self._state.get(name)
        if state is None:
            raise ENOENT(f"no tool {name!r}; tool.list shows them")
        check_args(state.tool, args)
        if len(state.queue) >= state.tool.queue:
            raise EAGAIN(f"tool {name!r} has {len(state.queue)} calls waiting (its queue limit); retry later")
        caller = call.caller.proc
        if caller is not None:  # one agent may hold a quarter of a tool's queue, so it cannot shut others out
            mine = sum(1 for job in state.queue if job.call.caller.proc is caller)
            if mine >= max(1, state.tool.queue // 4):
                raise EAGAIN(f"you have {mine} calls of tool {name!r} waiting (a quarter of its queue); wait for "
                             "their answers")
        state.queue.append(Job(next(self._ids), state.tool, args, call, time.monotonic()))
        self._dispatch(state)

    # ---- workers -------------------------------------------------------------------------------------

    def next(self, worker, call) -> None:
        """A worker's ``tool.next``: answered with a job now, or when one is queued."""
        name = self._worker_tool.get(worker.id)
        if name is None:
            raise EPERM("tool.next is for the kernel's tool workers")
        state = self._state[name]
        if worker.id in self._by_worker:
            raise EPERM("finish your job (tool.done) before asking for another")
        state.idle.append((worker, call))
        self._dispatch(state)

    def done(self, worker, job_id: int, result, error: str | None) -> None:
        """A worker's ``tool.done``: answer the caller."""
        job = self._by_worker.get(worker.id)
        if job is None or job.id != job_id:
            raise EINVAL(f"job {job_id} is not the one you are running")
        self._finish(job)
        if error is not None:
            job.call.fail("ETOOL", f"tool {job.tool.name!r} failed: {error}")
        else:
            job.call.reply({"result": result})
        state = self._state[job.tool.name]
        state.calls += 1

    def started(self, worker, name: str) -> None:
        """The kernel started ``worker`` for tool ``name``."""
        state = self._state[name]
        self._worker_tool[worker.id] = name
        state.workers.add(worker)

    def ended(self, worker, reason: str) -> None:
        """A worker process ended (any way): its job fails with ETOOL, and its place is refilled."""
        name = self._worker_tool.pop(worker.id, None)
        if name is None:
            return
        state = self._state[name]
        state.workers.discard(worker)
        state.idle = collections.deque((w, c) for w, c in state.idle if w is not worker)
        job = self._by_worker.get(worker.id)
        if job is not None:  # it died with a call in hand (a one-shot worker exits only after answering)
            self._finish(job)
            state.last_death = time.monotonic()
            job.call.fail("ETOOL", f"tool {name!r} died while running the call: {reason}")
        self._dispatch(state)

    def tick(self) -> None:
        """Kill the workers of calls past their tool's ``timeout_s`` (their callers get ETIMEDOUT); start the
        workers that queued calls wait for."""
        now = time.monotonic()
        for job in list(self._jobs.values()):
            if now - job.started_at > job.tool.timeout_s:
                self._finish(job)
                job.call.fail("ETIMEDOUT", f"tool {job.tool.name!r} ran past its {job.tool.timeout_s:g} s limit; "
                                           "its worker was killed")
                self._kill(job.worker, f"tool call past {job.tool.timeout_s:g} s")
        for state in self._state.values():
            self._dispatch(state)

    def job_of(self, worker) -> Job | None:
        """The call ``worker`` is running, if any."""
        return self._by_worker.get(worker.id)

    def cancel_caller(self, proc_id: int) -> None:
        """Drop the queued calls of an agent that ended (a running one finishes; its answer goes nowhere)."""
        for state in self._state.values():
            state.queue = collections.deque(j for j in state.queue
                                            if getattr(j.call.caller.proc, "id", None) != proc_id)

    def stats(self) -> dict:
        return {name: {"workers": len(s.workers), "idle": len(s.idle), "queued": len(s.queue), "calls": s.calls}
                for name, s in self._state.items()}

    # ---- internals ---------------------------------------------------------------------------------------

    def _finish(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        self._by_worker.pop(job.worker.id, None)

    def _dispatch(self, state: _State) -> None:
        """Hand queued calls to idle workers; start workers while calls wait and the tool has room."""
        while state.queue and state.idle:
            worker, next_call = state.idle.popleft()
            job = state.queue.popleft()
            if job.call.done:  # its caller is gone
                state.idle.appendleft((worker, next_call))
                continue
            job.worker, job.started_at = worker, time.monotonic()
            self._jobs[job.id] = job
            self._by_worker[worker.id] = job
            next_call.reply({"job": job.id, "name": job.tool.name, "args": job.args})
        busy = sum(1 for job in self._jobs.values() if job.tool is state.tool)
        waiting = len(state.queue) - (len(state.workers) - busy)  # calls no idle or starting worker will take
        room = state.tool.instances - len(state.workers)
        if waiting > 0 and room > 0 and time.monotonic() - state.last_death >= RESPAWN_PAUSE_S:
            for _ in range(min(waiting, room)):
                try:
                    self.started(self._spawn(state.tool), state.tool.name)
                except Exception as exc:  # noqa: BLE001 -- e.g. the process table is full: the calls wait
                    log.warning("tools: cannot start a %s worker: %s", state.tool.name, exc)
                    break


def check_args(tool: Tool, args) -> None:
    """EINVAL naming the offending field when ``args`` do not match the tool's schema."""
    if not isinstance(args, dict):
        raise EINVAL("args must be a map of the tool's parameters")
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(tool.parameters).iter_errors(args))
    if error is not None:
        where = "args" + "".join(f"[{p!r}]" if isinstance(p, str) else f"[{p}]" for p in error.absolute_path)
        raise EINVAL(f"{where}: {error.message} (tool {tool.name!r}; tool.list shows its schema)")
