"""The syscall router: one frame in, one path through.  identify -> charge -> decode -> authorise -> dispatch.

The router owns the kernel's ROUTER socket.  For every frame it identifies the caller from the connection's
``Peer-Address`` (SO_PEERCRED: uid, gid, pid) and routing id -- never from the payload --, charges the frame
to the caller's syscall rate (before decoding it, so that garbage is not free), decodes the envelope
(``syscalls.codec``), checks the syscall's privilege against the caller's group, decodes the arguments
against the syscall's schema, and calls the handler ``syscalls.table`` names (``kernel/sys_*.py``).  Whatever an agent sends, the
worst outcome is an error reply to that agent.

Identity fails closed (docs/design.md, "Identity"): a routing id the kernel handed an agent names that agent
for the agent's whole life and is refused after it (what an ended agent left queued is dropped unread); an
operator must present the operator credential *and* be a live process of the kernel's uid (or root) that does
not descend from the kernel; anything else is refused.
"""
from __future__ import annotations

import errno
import hmac
import importlib
import logging
import os
import select
import time

import zmq

from kernel.resources import charge_syscall
from syscalls import codec
from syscalls.address import OPERATOR_PREFIX
from syscalls.codec import RequestError
from syscalls.errors import EACCES, ENOSYS, EPERM, SyscallError
from syscalls.table import TABLE

log = logging.getLogger("aiosd.router")

# Per peer, in messages (libzmq counts them per connection): answers queued for a peer that does not read, and
# requests queued before the kernel reads them.  With answers bounded in size (docs/abi.md 7) this bounds
# what a peer can make the kernel hold.
ANSWER_HWM = 256
REQUEST_HWM = 64
STALL_S = 1.0  # a peer whose answer queue overflowed is not served for this long (its frames are dropped)
# While the kernel drains for shutdown (SIGTERM: kernel.request_shutdown) these are refused with ECANCELED: they
# start new work.  Everything else -- reading, the answers of work under way -- goes on.
DRAIN_REFUSED = frozenset({"proc.spawn", "llm.generate", "llm.chat", "tool.call"})
DEFERRED = object()  # a handler's "the answer comes later through the call" (streams, generations)


def handlers() -> dict:
    """Every syscall's handler, by name: ``TABLE``'s ``"module:function"`` references resolved.  Raises
    ``ImportError`` / ``AttributeError`` naming the entry when one does not resolve (a kernel bug, found at
    start and by the tests, never at the first call)."""
    resolved = {}
    for name, syscall in TABLE.items():
        module, _, function = syscall.handler.partition(":")
        try:
            resolved[name] = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError) as exc:
            raise type(exc)(f"syscalls/table.py: {name}'s handler {syscall.handler!r} does not resolve: {exc}")
    return resolved
MAX_CACHED_CALLERS = 4096


def _traced_args(raw) -> object:
    """A traced request's arguments as the agent sent them (kernel/trace.py bounds them)."""
    try:
        return codec.decode_any(raw)
    except Exception:  # undecodable: the schema's decoder will refuse it with EINVAL
        return "<undecodable>"


class _Drop(Exception):
    """A frame to drop unanswered: from an agent that has ended, or from a peer that does not read."""


class Caller:
    """Who made a syscall, as established from the connection.  ``proc`` is None for operators."""

    __slots__ = ("pid", "uid", "gid", "proc", "group", "privileges", "stalled_until", "dropped")

    def __init__(self, pid: int, uid: int, gid: int, proc, group: str, privileges: frozenset):
        self.pid, self.uid, self.gid, self.proc = pid, uid, gid, proc
        self.group, self.privileges = group, privileges
        self.stalled_until = 0.0  # monotonic time until which its frames are dropped
        self.dropped = 0  # answers and requests dropped because it did not read

    def describe(self) -> str:
        if self.proc is None:
            return f"operator (uid {self.uid}, pid {self.pid})"
        return f"agent {self.proc.id} ({self.proc.name})"

    def record(self) -> dict:
        if self.proc is not None:
            return self.proc.record()
        return {"id": None, "name": "operator", "group": self.group, "pid": self.pid, "uid": self.uid}


class Call:
    """One request in flight: answers go back to the connection it came from, chunks numbered from 0.
    For an LLM call, ``reserved`` is the tokens reserved for it against its caller's quota and ``ended`` tells
    that it no longer counts against the caller's pending cap (kernel.llm_submit)."""

    __slots__ = ("router", "rid", "routing_id", "caller", "seq", "done", "reserved", "ended", "name", "t0",
                 "trace", "traced_args")

    def __init__(self, router: "Router", rid: int, routing_id: bytes, caller: Caller, name: str = "",
                 t0: float = 0.0, trace=None, traced_args=None):
        self.router, self.rid, self.routing_id, self.caller = router, rid, routing_id, caller
        self.name, self.t0 = name, t0  # the syscall and when its frame was read (latency metrics)
        self.trace, self.traced_args = trace, traced_args  # the caller's kernel.trace.Trace, if it is traced
        self.seq = 0
        self.done = False
        self.reserved = 0
        self.ended = False

    @property
    def key(self) -> tuple[bytes, int]:
        """What names this request for ``llm.cancel``: the caller's connection and its request id."""
        return self.routing_id, self.rid

    def chunk(self, data) -> None:
        if not self.done:
            self.router.send(self.routing_id, codec.chunk(self.rid, self.seq, data), self.caller)
            self.seq += 1

    def reply(self, result) -> None:
        if not self.done:
            self.done = True
            self.router.send(self.routing_id, codec.reply_ok(self.rid, result), self.caller)
            if self.trace is not None:
                self.trace.add(self.name, self.traced_args, self.t0, True, result, self.seq)
            self.router.answered(self)

    def fail(self, code: str, message: str) -> None:
        if not self.done:
            self.done = True
            self.router.send(self.routing_id, codec.reply_error(self.rid, code, message), self.caller)
            if self.trace is not None:
                self.trace.add(self.name, self.traced_args, self.t0, False, code, self.seq)
            self.router.answered(self)


def parse_peer(peer: str | None) -> tuple[int, int, int]:
    """``Peer-Address`` of an ipc connection, ``[host]:uid:gid:pid`` -> (uid, gid, pid)."""
    try:
        _, uid, gid, pid = peer.rsplit(":", 3)
        return int(uid), int(gid), int(pid)
    except (AttributeError, ValueError):
        raise EACCES("the kernel cannot tell who you are (no peer credentials on this connection)") from None


def _ppid(pid: int) -> int | None:
    """The parent of ``pid`` from /proc, or None when it cannot be read (gone, or not visible)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split(None, 2)[1])  # field 4: ppid, after "(comm)"
    except (OSError, ValueError, IndexError):
        return None


def descends_from(pid: int, ancestor: int) -> bool | None:
    """True if ``ancestor`` is a proper ancestor of ``pid``, False if not, None when it cannot be told (a
    process on the way is gone or unreadable).  Callers must treat None as "yes" (fail closed)."""
    for _ in range(4096):
        pid = _ppid(pid)
        if pid is None:
            return None
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return None


def is_live_outsider(pid: int, kernel_pid: int) -> bool:
    """True only if ``pid`` is alive, does not descend from the kernel, and is still the same process after the
    ancestry check (pinned by a pidfd, so an exit during the check cannot be mistaken for a live outsider)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # gone (ESRCH), or no pidfd support: fail closed
        return False
    try:
        if descends_from(pid, kernel_pid) is not False:
            return False
        readable, _, _ = select.select([pidfd], [], [], 0)  # a pidfd turns readable when its process exits
        return not readable
    finally:
        os.close(pidfd)


class Router:
    """Owns the ROUTER socket; ``serve_ready()`` handles every frame waiting on it."""

    def __init__(self, kernel, ctx: zmq.Context, endpoint: str, max_frame: int, operator_key: bytes):
        self.kernel = kernel
        self.max_frame = max_frame
        self._operator_key = operator_key
        self.sock = ctx.socket(zmq.ROUTER)
        # Hard limit: libzmq drops a connection that sends more.  Between max_frame and this, E2BIG replies.
        self.sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_frame)
        self.sock.setsockopt(zmq.SNDHWM, ANSWER_HWM)
        self.sock.setsockopt(zmq.RCVHWM, REQUEST_HWM)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full or vanished peer is an error we see, not silence
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self._callers: dict[tuple[bytes, str], Caller] = {}
        self.metrics = getattr(kernel, "metrics", None)  # kernel/metrics.py: syscall latency
        self._uid = os.getuid()
        self._pid = os.getpid()
        self._warned_at = 0.0
        self._handlers = handlers()

    def send(self, routing_id: bytes, data: bytes, caller: Caller | None = None) -> None:
        """Queue one answer.  A peer whose queue is full loses it and is stalled (``STALL_S``): its memory is
        never the kernel's.  A peer that is gone loses it too."""
        try:
            self.sock.send_multipart((routing_id, data), flags=zmq.NOBLOCK)
        except zmq.Again:
            if caller is not None:
                caller.dropped += 1
                caller.stalled_until = time.monotonic() + STALL_S
                self._warn(f"{caller.describe()} does not read its answers; dropping them and its requests")
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise

    def _warn(self, message: str) -> None:
        """A warning at most once a second: what agents provoke must not flood the kernel's log."""
        now = time.monotonic()
        if now - self._warned_at >= 1.0:
            self._warned_at = now
            log.warning("%s", message)

    def serve_ready(self, budget: int = 256) -> None:
        """Handle up to ``budget`` frames already waiting (bounded so other work is not starved)."""
        sock, handle = self.sock, self.handle
        for _ in range(budget):
            if not sock.get(zmq.EVENTS) & zmq.POLLIN:  # cheaper than ending on a zmq.Again exception
                return
            handle(sock.recv_multipart(copy=False))

    def handle(self, frames) -> None:
        t0 = time.perf_counter()
        routing_id = frames[0].bytes
        payload = frames[-1]
        try:
            caller = self.identify(routing_id, payload.get("Peer-Address"))
        except _Drop:
            return
        except SyscallError as exc:
            self.send(routing_id, codec.reply_error(codec.peek_id(payload.bytes), exc.code, exc.message))
            return
        if caller.stalled_until and time.monotonic() < caller.stalled_until:
            caller.dropped += 1
            return
        rid = None
        trace = caller.proc.trace if caller.proc is not None else None
        name, traced_args, call = "?", None, None
        try:
            if caller.proc is not None:
                charge_syscall(caller.proc)  # before decoding: undecodable frames count too
            if len(frames) != 2:
                raise RequestError("EPROTO", f"send one frame per request, not {len(frames) - 1}", None)
            env = codec.decode_request(payload.bytes, self.max_frame)
            rid, name = env.id, env.call
            if trace is not None:
                traced_args = _traced_args(env.args)
            syscall = TABLE.get(env.call)
            if syscall is None:
                raise ENOSYS(f"no syscall {env.call!r}; see docs/abi.md section 4")
            if syscall.privilege not in caller.privileges:
                raise EPERM(f"group {caller.group!r} may not call {env.call} "
                            f"(needs privilege {syscall.privilege!r})")
            if env.call in DRAIN_REFUSED and self.kernel.draining():
                raise SyscallError(f"the kernel is shutting down: it admits no new work ({env.call})", "ECANCELED")
            args = codec.decode_args(syscall.decoder, env.args)
            call = Call(self, rid, routing_id, caller, env.call, t0, trace, traced_args)
            result = self._handlers[env.call](self.kernel, call, args)
            if result is not DEFERRED:
                call.reply(result)
        except RequestError as exc:
            self.send(routing_id, codec.reply_error(exc.rid, exc.code, exc.message), caller)
            self._trace_refusal(trace, call, name, traced_args, t0, exc.code)
        except SyscallError as exc:
            if rid is None:
                rid = codec.peek_id(payload.bytes)
            self.send(routing_id, codec.reply_error(rid, exc.code, exc.message), caller)
            self._trace_refusal(trace, call, name, traced_args, t0, exc.code)
        except Exception:  # a kernel bug must cost one request, never the kernel
            log.exception("syscall failed inside the kernel")
            self.send(routing_id, codec.reply_error(rid, "EIO", "internal kernel error; see the kernel log"), caller)
            self._trace_refusal(trace, call, name, traced_args, t0, "EIO")

    @staticmethod
    def _trace_refusal(trace, call: "Call | None", name: str, traced_args, t0: float, code: str) -> None:
        """A request answered with an error outside ``Call.fail`` goes into its caller's trace too."""
        if trace is not None and (call is None or not call.done):
            trace.add(name, traced_args, t0, False, code)

    def identify(self, routing_id: bytes, peer: str | None) -> Caller:
        """The caller behind this connection (docs/abi.md section 1).  Raises EPERM or EACCES, or ``_Drop``
        for a frame of an agent that has ended."""
        key = (routing_id, peer)
        caller = self._callers.get(key)
        if caller is None:
            caller = self._new_caller(routing_id, peer)
            if len(self._callers) >= MAX_CACHED_CALLERS:  # forgetting is safe: identification is repeatable
                del self._callers[next(iter(self._callers))]
            self._callers[key] = caller
        proc = caller.proc
        if proc is not None:
            if not proc.alive:
                raise _Drop
            proc.syscalls += 1
            if proc.first_syscall_at is None:
                proc.first_syscall_at = time.time()
        return caller

    def _new_caller(self, routing_id: bytes, peer: str | None) -> Caller:
        uid, gid, pid = parse_peer(peer)
        procs, groups = self.kernel.procs, self.kernel.config.groups
        proc = procs.by_token(routing_id)  # every agent this kernel ever started, ended ones included
        if proc is not None:
            if not proc.alive:
                raise _Drop
            if proc.pid != pid:
                self._warn(f"pid {pid} used the routing id of agent {proc.id} (pid {proc.pid}); refused")
                raise EPERM("this connection carries another process's agent identity; only the agent itself "
                            "may use it")
            group = groups.get(proc.group)
            return Caller(pid, uid, gid, proc, proc.group, group.privileges if group else frozenset())
        if procs.by_pid(pid) is not None:
            self._warn(f"agent pid {pid} sent with a forged routing id; refused")
            raise EPERM("this connection does not carry your agent identity; use the SDK's connection")
        if descends_from(pid, self._pid) is not False:
            raise EPERM(f"pid {pid} is a descendant of an agent (or already gone), not an agent; only agents "
                        "make syscalls")
        if not self._is_operator_id(routing_id):
            raise EACCES("not an agent of this kernel, and the connection does not present the operator "
                         "credential (run aiosctl as the kernel's user: it reads <runtime-dir>/operator.key)")
        if uid not in (self._uid, 0):
            raise EACCES(f"uid {uid} is not served by this kernel")
        if not is_live_outsider(pid, self._pid):
            raise EPERM(f"pid {pid} is gone or descends from the kernel; operators are live processes outside it")
        return Caller(pid, uid, gid, None, "admin", groups["admin"].privileges)

    def _is_operator_id(self, routing_id: bytes) -> bool:
        """``b"O"`` + the operator key + 8 bytes (syscalls.address.operator_routing_id), compared in constant
        time."""
        n = len(self._operator_key)
        return (len(routing_id) == 1 + n + 8 and routing_id.startswith(OPERATOR_PREFIX)
                and hmac.compare_digest(routing_id[1:1 + n], self._operator_key))

    def answered(self, call: Call) -> None:
        """A call got its final answer: its latency goes to the metrics (calls of the ABI table only)."""
        if call.t0 and self.metrics is not None:
            self.metrics.observe(call.name, time.perf_counter() - call.t0)

    def forget_all(self) -> None:
        """Drop every cached identification (a config reload changed the groups); the next frame of each
        connection is identified afresh."""
        self._callers.clear()

    def forget(self, proc) -> None:
        """Drop cached callers of an ended process (its frames are refused through ``by_token`` from now on)."""
        for key in [k for k, c in self._callers.items() if c.proc is proc]:
            del self._callers[key]

    def close(self) -> None:
        self.sock.close(linger=0)
