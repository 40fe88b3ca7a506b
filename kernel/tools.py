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
import json
import logging
import re
import time
from dataclasses import dataclass, field

import jsonschema

from syscalls.errors import EAGAIN, EINVAL, ENOENT, EPERM

log = logging.getLogger("aiosd.tools")

TOOL_GROUP = "tool"  # the internal privilege group of workers (kernel/config.py)
RESPAWN_PAUSE_S = 1.0  # a tool whose workers keep dying is restarted at most this often


@dataclass(frozen=True)
class Pool:
    """The workers that serve tools: one built-in tool's, or one MCP server's (all of its tools).  Calls of its
    tools share its ``instances`` workers and its FIFO queue."""
    name: str
    instances: int = 2        # workers at most: calls run at most this many at once
    timeout_s: float = 10.0   # wall time of one call
    memory_mb: int = 256      # each worker's memory limit
    cpu_seconds: int = 60     # each worker's CPU limit (over its life)
    queue: int = 64           # calls waiting beyond the running ones (EAGAIN past it)
    once: bool = False        # a worker serves one call, then exits (tools that run the caller's code)
    server: object = None     # an MCP server's config (kernel.config.McpServer); None: a built-in tool
    profile: tuple = ()       # sandbox profile chosen from the server's tool hints: ("network",), ("read_only",)

    def limits(self) -> dict:
        return {"instances": self.instances, "timeout_s": self.timeout_s, "memory_mb": self.memory_mb,
                "queue": self.queue}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict          # JSON Schema of the arguments
    pool: str = ""            # the Pool that serves it ("": its own name)
    output: dict | None = None  # JSON Schema its result must match (an MCP tool's: its structured content)
    hints: dict = field(default_factory=dict)  # an MCP tool's annotations (readOnlyHint, destructiveHint, ...)
    confirm: bool = False     # calls wait for an operator (kernel/access.py) before they are queued
    remote: str = ""          # an MCP tool's name on its server
    acts_for_caller: bool = False  # while on a call, its storage syscalls use the caller's rights (sys_storage)

    def record(self, pool: Pool) -> dict:
        rec = {"name": self.name, "description": self.description, "parameters": self.parameters,
               "limits": pool.limits()}
        if pool.server is not None:
            rec.update(server=pool.server.name, output=self.output, hints=self.hints, confirm=self.confirm)
        return rec


def _builtin(name: str, description: str, parameters: dict, *, acts_for_caller: bool = False,
             **limits) -> tuple[Tool, Pool]:
    return Tool(name, description, parameters, pool=name, acts_for_caller=acts_for_caller), Pool(name, **limits)


_BUILTINS = (
    _builtin("calculator", "Evaluate an arithmetic expression: numbers, + - * / // % **, parentheses, sqrt, log, "
             "exp, sin, cos, tan, abs, round, min, max, floor, ceil, pi, e.",
             {"type": "object", "properties": {"expression": {"type": "string", "minLength": 1, "maxLength": 1000}},
              "required": ["expression"], "additionalProperties": False}),
    _builtin("text", "Text utilities: count words/lines/characters, upper, lower, replace, find a regular "
             "expression.",
             {"type": "object", "properties": {
                 "op": {"enum": ["count", "upper", "lower", "replace", "find"]},
                 "text": {"type": "string", "maxLength": 100_000},
                 "pattern": {"type": "string", "maxLength": 1000},
                 "replacement": {"type": "string", "maxLength": 1000}},
              "required": ["op", "text"], "additionalProperties": False}, instances=1),
    _builtin("clock", "The current time: unix seconds and ISO 8601 at a UTC offset in minutes.",
             {"type": "object", "properties": {"utc_offset_minutes": {"type": "integer", "minimum": -840,
                                                                       "maximum": 840}},
              "additionalProperties": False}, instances=1),
    _builtin("storage", "Read, write or list the calling agent's own storage (with the caller's rights: its "
             "namespace, its grants, its quotas).",
             {"type": "object", "properties": {
                 "op": {"enum": ["read", "write", "list"]},
                 "key": {"type": "string", "minLength": 1, "maxLength": 1024},
                 "data": {"type": "string", "maxLength": 100_000}, "prefix": {"type": "string", "maxLength": 1024}},
              "required": ["op"], "additionalProperties": False,
              "allOf": [{"if": {"properties": {"op": {"enum": ["read", "write"]}}}, "then": {"required": ["key"]}},
                        {"if": {"properties": {"op": {"const": "write"}}}, "then": {"required": ["data"]}}]},
             instances=2, acts_for_caller=True),
    _builtin("python", "Run Python code in a sandbox (no network, no subprocesses, its own scratch dir, memory "
             "and time limits); returns stdout, stderr and the value of the last expression.",
             {"type": "object", "properties": {"code": {"type": "string", "minLength": 1, "maxLength": 100_000}},
              "required": ["code"], "additionalProperties": False},
             instances=2, timeout_s=10.0, memory_mb=512, once=True),
)
BUILTIN_TOOLS = {t.name: t for t, _ in _BUILTINS}
BUILTIN_POOLS = {p.name: p for _, p in _BUILTINS}


def permits(allowed: frozenset | None, name: str) -> bool:
    """Whether a group's ``tools`` list (None: every tool) lets it call ``name``; ``"SERVER.*"`` names every
    tool of an MCP server."""
    return allowed is None or name in allowed or ("." in name and name.split(".", 1)[0] + ".*" in allowed)


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
    """One pool's workers and queue."""
    pool: Pool
    queue: collections.deque = field(default_factory=collections.deque)   # Jobs waiting
    idle: collections.deque = field(default_factory=collections.deque)    # (worker Proc, its tool.next Call)
    workers: set = field(default_factory=set)                             # live worker Procs
    last_death: float = 0.0
    calls: int = 0


@dataclass(eq=False)
class _Server:
    """An MCP server's discovery: a worker starts it, lists its tools (``tool.register``) and exits."""
    config: object                   # kernel.config.McpServer
    state: str = "starting"          # starting | ready | failed
    error: str | None = None
    tools: int = 0
    worker: object = None            # the discovery worker while one runs
    started_at: float = 0.0
    retry_at: float = 0.0
    failures: int = 0
    collected: list = field(default_factory=list)  # tools registered so far by the running discovery

    def record(self) -> dict:
        return {"name": self.config.name, "state": self.state, "error": self.error, "tools": self.tools}


class ToolManager:
    """The tools of one kernel.  ``spawn(pool, discover)`` starts a worker process for ``pool`` and returns its
    Proc (kernel.py ``_spawn_tool_worker``); the kernel tells the manager when a worker ends.  ``servers``: the
    configured MCP servers, whose tools join ``tools`` once a discovery worker has listed them."""

    def __init__(self, tools: dict[str, Tool], pools: dict[str, Pool], spawn, kill, servers=()):
        self.tools = dict(tools)
        self.pools = dict(pools)
        self._spawn, self._kill = spawn, kill
        self._state = {name: _State(p) for name, p in self.pools.items()}
        self._jobs: dict[int, Job] = {}       # running, by id
        self._by_worker: dict[int, Job] = {}  # worker proc id -> its running job
        self._worker_pool: dict[int, str] = {}
        self._servers = {c.name: _Server(c) for c in servers}
        self._discovering: dict[int, _Server] = {}  # discovery worker proc id -> its server
        self._list_waiters: list = []         # (deadline, answer) of tool.list calls waiting for discovery
        self._ids = itertools.count(1)

    # ---- agents --------------------------------------------------------------------------------------

    def list(self, allowed: frozenset | None = None) -> dict:
        """``tool.list``'s answer for a group allowed ``allowed``: its tools, and the MCP servers it may use."""
        tools = [t.record(self.pools[t.pool]) for t in self.tools.values() if permits(allowed, t.name)]
        servers = [s.record() for name, s in self._servers.items() if permits(allowed, f"{name}.*")
                   or any(t.startswith(name + ".") for t in allowed or ())]
        return {"tools": tools, "servers": servers}

    def starting(self) -> bool:
        """Is an MCP server still starting for the first time (its tools not yet known)?"""
        return any(s.state == "starting" for s in self._servers.values())

    def server_starting(self, name: str) -> bool:
        """Is ``name`` an unknown tool of an MCP server still starting for the first time?"""
        server = self._server_of(name)
        return name not in self.tools and server is not None and server.state == "starting"

    def when_listed(self, answer) -> None:
        """Call ``answer()`` once no MCP server is ``starting`` any more, at most ``LIST_WAIT_S`` from now: a
        ``tool.list`` right after boot shows the servers' tools, not an empty list."""
        if len(self._list_waiters) >= MAX_LIST_WAITERS:  # agents asking again and again: answer them as things are
            answer()
            return
        self._list_waiters.append((time.monotonic() + LIST_WAIT_S, answer))

    def check(self, name: str, args) -> Tool:
        """The tool ``name`` if ``args`` fit its schema: ENOENT (no such tool), EINVAL (the offending field)."""
        tool = self.tools.get(name)
        if tool is None:
            server = self._server_of(name)
            if server is not None and server.state != "ready":
                raise ENOENT(f"no tool {name!r}: MCP server {server.config.name!r} is {server.state}"
                             + (f" ({server.error})" if server.error else ""))
            raise ENOENT(f"no tool {name!r}; tool.list shows them")
        check_args(tool, args)
        return tool

    def call(self, call, name: str, args: dict) -> None:
        """Queue a call of tool ``name``; its answer comes through ``call``.  ENOENT, EINVAL (``check``), EAGAIN
        (the tool's queue is full, or the caller holds a quarter of it)."""
        tool = self.check(name, args)
        state = self._state[tool.pool]
        limit = state.pool.queue
        if len(state.queue) >= limit:
            raise EAGAIN(f"tool {name!r} has {len(state.queue)} calls waiting (its queue limit); retry later")
        caller = call.caller.proc
        if caller is not None:  # one agent may hold a quarter of a tool's queue, so it cannot shut others out
            mine = sum(1 for job in state.queue if job.call.caller.proc is caller)
            if mine >= max(1, limit // 4):
                raise EAGAIN(f"you have {mine} calls of tool {name!r} waiting (a quarter of its queue); wait for "
                             "their answers")
        state.queue.append(Job(next(self._ids), tool, args, call, time.monotonic()))
        self._dispatch(state)

    # ---- workers -------------------------------------------------------------------------------------

    def next(self, worker, call) -> None:
        """A worker's ``tool.next``: answered with a job now, or when one is queued."""
        name = self._worker_pool.get(worker.id)
        if name is None:
            raise EPERM("tool.next is for the kernel's tool workers")
        state = self._state[name]
        if worker.id in self._by_worker:
            raise EPERM("finish your job (tool.done) before asking for another")
        state.idle.append((worker, call))
        self._dispatch(state)

    def done(self, worker, job_id: int, result, error: str | None) -> None:
        """A worker's ``tool.done``: answer the caller (ETOOL if the tool failed, or if its result does not
        match its output schema)."""
        job = self._by_worker.get(worker.id)
        if job is None or job.id != job_id:
            raise EINVAL(f"job {job_id} is not the one you are running")
        self._finish(job)
        self._state[job.tool.pool].calls += 1
        if error is None and job.tool.output is not None:
            error = _output_error(job.tool, result)
        if error is not None:
            job.call.fail("ETOOL", f"tool {job.tool.name!r} failed: {error}")
        else:
            job.call.reply({"result": result})

    def register(self, worker, tools: list, final: bool = True) -> dict:
        """A discovery worker's ``tool.register``: its MCP server's tools, in one or more batches (``final`` on
        the last), join the registry.  Each is checked (a name, valid JSON Schemas, bounded sizes); the others
        are left out, and said so."""
        server = self._discovering.get(worker.id)
        if server is None or server.state == "ready":
            raise EPERM("tool.register is for the kernel's MCP discovery workers, once")
        cfg = server.config
        added, skipped = [], []
        for spec in tools:
            if len(server.collected) >= MAX_SERVER_TOOLS:
                skipped.append(f"tools past the first {MAX_SERVER_TOOLS}")
                break
            try:
                added.append(_mcp_tool(cfg, spec))
            except ValueError as exc:
                skipped.append(str(exc))
            else:
                server.collected.append(added[-1])
        for why in skipped:
            log.warning("MCP server %s: tool left out: %s", cfg.name, why)
        if final:
            self._install(server)
        return {"tools": [t.name for t in added], "skipped": skipped}

    def _install(self, server: "_Server") -> None:
        """The server's collected tools replace its old ones; its pool gets the profile their hints chose."""
        cfg, tools = server.config, server.collected
        server.collected = []
        profile = _profile(cfg, [t.hints for t in tools])
        pool = Pool(cfg.name, instances=cfg.instances, timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb,
                    cpu_seconds=cfg.cpu_seconds, queue=cfg.queue, server=cfg, profile=profile)
        self.pools[cfg.name] = pool
        self._state.setdefault(cfg.name, _State(pool)).pool = pool
        for name in [n for n in self.tools if n.startswith(cfg.name + ".")]:
            del self.tools[name]
        self.tools.update((t.name, t) for t in tools)
        server.state, server.error, server.tools, server.failures = "ready", None, len(tools), 0
        log.info("MCP server %s: %d tools (%s); sandbox profile: %s", cfg.name, len(tools),
                 ", ".join(t.name for t in tools) or "none", ", ".join(profile) or "no network, writable scratch")
        self._answer_lists()

    def started(self, worker, pool: str) -> None:
        """The kernel started ``worker`` to serve ``pool``."""
        state = self._state[pool]
        self._worker_pool[worker.id] = pool
        state.workers.add(worker)

    def ended(self, worker, reason: str, last_words: str = "") -> None:
        """A worker process ended (any way): its job fails with ETOOL, and its place is refilled.
        ``last_words``: its last line of output, which says why a discovery worker failed (it served no calls,
        so it holds no caller's data)."""
        server = self._discovering.pop(worker.id, None)
        if server is not None:
            server.worker, server.collected = None, []
            if server.state != "ready":
                self._discovery_failed(server, f"its discovery worker ended before listing tools: {reason}"
                                               + (f": {last_words[-500:]}" if last_words else ""))
            return
        name = self._worker_pool.pop(worker.id, None)
        if name is None:
            return
        state = self._state[name]
        state.workers.discard(worker)
        state.idle = collections.deque((w, c) for w, c in state.idle if w is not worker)
        job = self._by_worker.get(worker.id)
        if job is not None:  # it died with a call in hand (a one-shot worker exits only after answering)
            self._finish(job)
            state.last_death = time.monotonic()
            job.call.fail("ETOOL", f"tool {job.tool.name!r} died while running the call: {reason}")
        self._dispatch(state)

    def tick(self) -> None:
        """Kill the workers of calls past their pool's ``timeout_s`` (their callers get ETIMEDOUT); start the
        workers that queued calls wait for; start, time out and retry MCP servers' discovery."""
        now = time.monotonic()
        for job in list(self._jobs.values()):
            limit = self.pools[job.tool.pool].timeout_s
            if now - job.started_at > limit:
                self._finish(job)
                job.call.fail("ETIMEDOUT", f"tool {job.tool.name!r} ran past its {limit:g} s limit; its worker "
                                           "was killed")
                self._kill(job.worker, f"tool call past {limit:g} s")
        for server in self._servers.values():
            self._discover(server, now)
        if self._list_waiters:
            self._answer_lists(now)
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

    def busy(self) -> bool:
        """Is a tool call queued or running?"""
        return bool(self._jobs) or any(s.queue for s in self._state.values())

    def stats(self) -> dict:
        return {name: {"workers": len(s.workers), "idle": len(s.idle), "queued": len(s.queue), "calls": s.calls}
                for name, s in self._state.items()}

    # ---- internals ---------------------------------------------------------------------------------------

    def _server_of(self, name: str) -> "_Server | None":
        """The MCP server whose tool ``name`` (``SERVER.TOOL``) would be, if one is configured."""
        return self._servers.get(name.split(".", 1)[0]) if "." in name else None

    def _finish(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        self._by_worker.pop(job.worker.id, None)

    def _dispatch(self, state: _State) -> None:
        """Hand queued calls to idle workers; start workers while calls wait and the pool has room."""
        while state.queue and state.idle:
            worker, next_call = state.idle.popleft()
            job = state.queue.popleft()
            if job.call.done:  # its caller is gone
                state.idle.appendleft((worker, next_call))
                continue
            job.worker, job.started_at = worker, time.monotonic()
            self._jobs[job.id] = job
            self._by_worker[worker.id] = job
            next_call.reply({"job": job.id, "name": job.tool.remote or job.tool.name, "args": job.args})
        busy = sum(1 for job in self._jobs.values() if job.tool.pool == state.pool.name)
        waiting = len(state.queue) - (len(state.workers) - busy)  # calls no idle or starting worker will take
        room = state.pool.instances - len(state.workers)
        if waiting > 0 and room > 0 and time.monotonic() - state.last_death >= RESPAWN_PAUSE_S:
            for _ in range(min(waiting, room)):
                try:
                    self.started(self._spawn(state.pool, False), state.pool.name)
                except Exception as exc:  # noqa: BLE001 -- e.g. the process table is full: the calls wait
                    log.warning("tools: cannot start a %s worker: %s", state.pool.name, exc)
                    break

    def _discover(self, server: _Server, now: float) -> None:
        """Start a server's discovery worker when due; kill one that has not listed tools in time."""
        if server.state == "ready":
            return
        if server.worker is not None:
            if now - server.started_at > server.config.start_timeout_s:
                self._kill(server.worker, f"MCP server start past {server.config.start_timeout_s:g} s")
                # ended() records the failure
            return
        if now < server.retry_at:
            return
        cfg = server.config
        try:
            worker = self._spawn(Pool(cfg.name, memory_mb=cfg.memory_mb, cpu_seconds=cfg.cpu_seconds, server=cfg),
                                 True)
        except Exception as exc:  # noqa: BLE001 -- the process table may be full: retry later
            self._discovery_failed(server, f"cannot start it: {exc}")
            return
        server.worker, server.started_at = worker, now
        self._discovering[worker.id] = server

    def _discovery_failed(self, server: _Server, why: str) -> None:
        server.failures += 1
        server.state, server.error = "failed", why
        server.retry_at = time.monotonic() + min(DISCOVERY_RETRY_MAX_S, 2 ** server.failures)
        log.warning("MCP server %s: %s (retry in %.0f s)", server.config.name, why,
                    server.retry_at - time.monotonic())
        self._answer_lists()

    def _answer_lists(self, now: float | None = None) -> None:
        starting = self.starting()
        now = time.monotonic() if now is None else now
        keep = []
        for deadline, answer in self._list_waiters:
            if starting and now < deadline:
                keep.append((deadline, answer))
                continue
            try:
                answer()
            except Exception:  # noqa: BLE001 -- a bug here must not leave the event loop
                log.exception("tools: answering a call held for MCP discovery failed")
        self._list_waiters = keep


MAX_LIST_WAITERS = 1024      # tool.list calls held while servers start (the rest are answered at once)
LIST_WAIT_S = 20.0           # a tool.list waits at most this long for MCP servers still starting
DISCOVERY_RETRY_MAX_S = 60.0  # a failed MCP server is retried after 2, 4, 8 ... s, at most this long
MAX_SERVER_TOOLS = 256        # tools one MCP server may register
MAX_SCHEMA_BYTES = 64 << 10   # one tool's input or output schema, as JSON
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
_HINTS = ("readOnlyHint", "destructiveHint", "idempotentHint", "openWorldHint")


def _mcp_tool(cfg, spec) -> Tool:
    """One tool of MCP server ``cfg`` from what its discovery worker reported; ValueError saying what is wrong."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError("a tool without a name")
    name = spec["name"]
    if not _TOOL_NAME.fullmatch(name):
        raise ValueError(f"{name[:80]!r}: a tool name is 1-64 letters, digits, '_', '-', '.'")
    schemas = {}
    for key in ("input_schema", "output_schema"):
        schema = spec.get(key)
        if schema is None and key == "output_schema":
            schemas[key] = None
            continue
        if not isinstance(schema, dict) or len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
            raise ValueError(f"{name}: its {key} is not a JSON object of at most {MAX_SCHEMA_BYTES} bytes")
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
            list(jsonschema.Draft202012Validator(_without_regex(schema)).iter_errors({}))  # a trial run
        except jsonschema.exceptions.SchemaError as exc:
            raise ValueError(f"{name}: its {key} is not a valid JSON Schema: {exc.message}") from None
        except (RecursionError, jsonschema.exceptions.RefResolutionError, Exception) as exc:  # noqa: BLE001
            raise ValueError(f"{name}: its {key} cannot be checked ({type(exc).__name__}: {exc})"[:300]) from None
        schemas[key] = schema
    raw = spec.get("annotations") if isinstance(spec.get("annotations"), dict) else {}
    hints = {k: raw[k] for k in _HINTS if isinstance(raw.get(k), bool)}
    # MCP's defaults: a tool is not read-only, is destructive and reaches an open world unless it says otherwise
    destructive = not hints.get("readOnlyHint", False) and hints.get("destructiveHint", True)
    confirm = cfg.confirm == "always" or (cfg.confirm == "destructive" and destructive)
    description = spec.get("description") if isinstance(spec.get("description"), str) else ""
    return Tool(f"{cfg.name}.{name}", description[:4096], schemas["input_schema"], pool=cfg.name,
                output=schemas["output_schema"], hints=hints, confirm=confirm, remote=name)


def _profile(cfg, hints: list[dict]) -> tuple:
    """The sandbox profile of an MCP server's serving workers.  Hints only ever narrow what the operator
    allowed (they are the server's own claims): the network only if the config allows it and some tool may
    reach an open world; a read-only filesystem when every tool says it is read-only."""
    profile = []
    if cfg.network and any(h.get("openWorldHint", True) for h in hints):
        profile.append("network")
    if hints and all(h.get("readOnlyHint", False) for h in hints):
        profile.append("read_only")
    return tuple(profile)


def mcp_profile(cfg, profile: tuple) -> tuple[dict, dict]:
    """(what the bridge needs to start MCP server ``cfg``, the ``Host.prepare`` keywords of its sandbox).

    The bridge and the server share one sandbox: processes and ``exec`` allowed (the server is a program),
    no network unless ``profile`` has it, a read-only filesystem if ``profile`` says so, and beyond what agents
    may read: the program, the config's ``read`` paths and absolute file arguments, and the installed
    distributions of the ``mcp`` package and of the config's ``packages`` (with their requirements)."""
    from sandbox.paths import program_paths

    argv, read, listed = program_paths(cfg.command, ("mcp", *cfg.packages))
    read = [*read, *cfg.read]
    spec = {"name": cfg.name, "command": argv, "env": dict(cfg.env)}
    return spec, {"allow_fork": True, "allow_exec": True, "network": "network" in profile,
                  "read_only": "read_only" in profile, "read_extra": tuple(dict.fromkeys(read)),
                  "list_extra": tuple(dict.fromkeys(listed))}


def _output_error(tool: Tool, result) -> str | None:
    """Why ``result`` does not match ``tool``'s output schema (None if it does).  An MCP tool's structured
    content is what its schema describes."""
    instance = result.get("structured") if tool.remote and isinstance(result, dict) else result
    if tool.remote and instance is None:
        return "it declares an output schema but returned no structured content"
    where = _mismatch(tool, tool.output, instance, "result")
    return None if where is None else f"its result does not match its output schema: {where}"


def check_args(tool: Tool, args) -> None:
    """EINVAL naming the offending field when ``args`` do not match the tool's schema."""
    if not isinstance(args, dict):
        raise EINVAL("args must be a map of the tool's parameters")
    where = _mismatch(tool, tool.parameters, args, "args")
    if where is not None:
        raise EINVAL(f"{where} (tool {tool.name!r}; tool.list shows its schema)")


_SCHEMA_MAPS = ("properties", "$defs", "definitions", "dependentSchemas")  # name -> schema, names are data


def _without_regex(schema):
    """A copy of an MCP server's schema without regular expressions (``pattern``, ``patternProperties`` and the
    ``additionalProperties`` beside one), for the kernel's own check: Python's ``re`` cannot be stopped, and a
    server's pattern with catastrophic backtracking would let an agent's string stall the kernel's event loop.
    The server checks those itself (docs/tools.md)."""
    if isinstance(schema, list):
        return [_without_regex(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: ({name: _without_regex(sub) for name, sub in v.items()} if k in _SCHEMA_MAPS and isinstance(v, dict)
               else v if k in ("enum", "const", "default", "examples") else _without_regex(v))
           for k, v in schema.items() if k not in ("pattern", "patternProperties")}
    if "patternProperties" in schema:
        out.pop("additionalProperties", None)
    return out


def _mismatch(tool: Tool, schema: dict, instance, what: str) -> str | None:
    """``"what[path]: message"`` for the best error of ``instance`` against ``schema``, or None."""
    if tool.remote:
        schema = _without_regex(schema)
    try:
        error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(instance))
    except RecursionError:  # e.g. {"$ref": "#"} from a server
        return f"{what}: the tool's schema recurses without end"
    if error is None:
        return None
    where = what + "".join(f"[{p!r}]" if isinstance(p, str) else f"[{p}]" for p in error.absolute_path)
    return f"{where}: {error.message}"
