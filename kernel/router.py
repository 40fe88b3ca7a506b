"""The syscall router: one frame in, one path through.  decode -> identify -> authorise -> dispatch.

The router owns the kernel's ROUTER socket.  For every frame it decodes the envelope (``syscalls.codec``),
identifies the caller from the connection's ``Peer-Address`` (SO_PEERCRED: uid, gid, pid) and routing id --
never from the payload -- checks the syscall's privilege against the caller's group, decodes the arguments
against the syscall's schema, and calls the handler from ``syscalls.table``.  Whatever an agent sends, the
worst outcome is an error reply to that agent.
"""
from __future__ import annotations

import logging
import os
import time

import zmq

from kernel.resources import charge_syscall
from syscalls import codec
from syscalls.codec import RequestError
from syscalls.errors import EACCES, EIO, ENOSYS, EPERM, EPROTO, SyscallError
from syscalls.table import DEFERRED, TABLE

log = logging.getLogger("aiosd.router")


class Caller:
    """Who made a syscall, as established from the connection.  ``proc`` is None for operators."""

    __slots__ = ("pid", "uid", "gid", "proc", "group", "privileges")

    def __init__(self, pid: int, uid: int, gid: int, proc, group: str, privileges: frozenset):
        self.pid, self.uid, self.gid, self.proc = pid, uid, gid, proc
        self.group, self.privileges = group, privileges

    def describe(self) -> str:
        if self.proc is None:
            return f"operator (uid {self.uid}, pid {self.pid})"
        return f"agent {self.proc.id} ({self.proc.name})"

    def record(self) -> dict:
        if self.proc is not None:
            return self.proc.record()
        return {"id": None, "name": "operator", "group": self.group, "pid": self.pid, "uid": self.uid}


class Call:
    """One request in flight: answers go back to the connection it came from, chunks numbered from 0."""

    __slots__ = ("router", "rid", "routing_id", "caller", "seq", "done")

    def __init__(self, router: "Router", rid: int, routing_id: bytes, caller: Caller):
        self.router, self.rid, self.routing_id, self.caller = router, rid, routing_id, caller
        self.seq = 0
        self.done = False

    def chunk(self, data) -> None:
        if not self.done:
            self.router.send(self.routing_id, codec.chunk(self.rid, self.seq, data))
            self.seq += 1

    def reply(self, result) -> None:
        if not self.done:
            self.done = True
            self.router.send(self.routing_id, codec.reply_ok(self.rid, result))

    def fail(self, code: str, message: str) -> None:
        if not self.done:
            self.done = True
            self.router.send(self.routing_id, codec.reply_error(self.rid, code, message))


def parse_peer(peer: str | None) -> tuple[int, int, int]:
    """``Peer-Address`` of an ipc connection, ``[host]:uid:gid:pid`` -> (uid, gid, pid)."""
    try:
        _, uid, gid, pid = peer.rsplit(":", 3)
        return int(uid), int(gid), int(pid)
    except (AttributeError, ValueError):
        raise EACCES("the kernel cannot tell who you are (no peer credentials on this connection)") from None


def descends_from(pid: int, ancestor: int) -> bool:
    """True if ``ancestor`` is a proper ancestor of ``pid`` (reads /proc; False if ``pid`` is gone)."""
    for _ in range(256):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return False
        pid = int(stat[stat.rindex(b")") + 2:].split(None, 2)[1])  # field 4: ppid, after "(comm)"
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return False


class Router:
    """Owns the ROUTER socket; ``serve_ready()`` handles every frame waiting on it."""

    def __init__(self, kernel, ctx: zmq.Context, endpoint: str, max_frame: int):
        self.kernel = kernel
        self.max_frame = max_frame
        self.sock = ctx.socket(zmq.ROUTER)
        # Hard limit: libzmq drops a connection that sends more.  Between max_frame and this, E2BIG replies.
        self.sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_frame)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self._callers: dict[tuple[bytes, str], Caller] = {}
        self._uid = os.getuid()
        self._pid = os.getpid()

    def send(self, routing_id: bytes, data: bytes) -> None:
        try:
            self.sock.send_multipart((routing_id, data), flags=zmq.NOBLOCK)
        except zmq.Again:  # the peer's queue is full or it is gone: its loss, never the kernel's
            log.warning("dropped an answer to a peer that does not read")

    def serve_ready(self, budget: int = 256) -> None:
        """Handle up to ``budget`` frames already waiting (bounded so other work is not starved)."""
        sock, handle = self.sock, self.handle
        for _ in range(budget):
            if not sock.get(zmq.EVENTS) & zmq.POLLIN:  # cheaper than ending on a zmq.Again exception
                return
            handle(sock.recv_multipart(copy=False))

    def handle(self, frames) -> None:
        routing_id = frames[0].bytes
        rid = None
        try:
            if len(frames) != 2:
                raise RequestError("EPROTO", f"send one frame per request, not {len(frames) - 1}", None)
            payload = frames[1]
            env = codec.decode_request(payload.bytes, self.max_frame)
            rid = env.id
            caller = self.identify(routing_id, payload.get("Peer-Address"))
            syscall = TABLE.get(env.call)
            if syscall is None:
                raise ENOSYS(f"no syscall {env.call!r}; see docs/abi.md section 4")
            if syscall.privilege not in caller.privileges:
                raise EPERM(f"group {caller.group!r} may not call {env.call} "
                            f"(needs privilege {syscall.privilege!r})")
            args = codec.decode_args(syscall.decoder, env.args)
            call = Call(self, rid, routing_id, caller)
            result = syscall.handler(self.kernel, call, args)
            if result is not DEFERRED:
                call.reply(result)
        except RequestError as exc:
            self.send(routing_id, codec.reply_error(exc.rid, exc.code, exc.message))
        except SyscallError as exc:
            self.send(routing_id, codec.reply_error(rid, exc.code, exc.message))
        except Exception:  # a kernel bug must cost one request, never the kernel
            log.exception("syscall failed inside the kernel")
            self.send(routing_id, codec.reply_error(rid, "EIO", "internal kernel error; see the kernel log"))

    def identify(self, routing_id: bytes, peer: str | None) -> Caller:
        """The caller behind this connection (docs/abi.md section 1).  Raises EPERM or EACCES."""
        key = (routing_id, peer)
        caller = self._callers.get(key)
        if caller is None:
            caller = self._new_caller(routing_id, peer)
            self._callers[key] = caller
        proc = caller.proc
        if proc is not None:
            if not proc.alive:
                raise EPERM(f"agent {proc.id} has ended")
            proc.syscalls += 1
            if proc.first_syscall_at is None:
                proc.first_syscall_at = time.time()
            charge_syscall(proc)
        return caller

    def _new_caller(self, routing_id: bytes, peer: str | None) -> Caller:
        uid, gid, pid = parse_peer(peer)
        proc = self.kernel.procs.by_pid(pid)
        groups = self.kernel.config.groups
        if proc is not None:
            if routing_id != proc.token:
                log.warning("agent %d (pid %d) sent with a forged routing id; refused", proc.id, pid)
                raise EPERM("this connection does not carry your agent identity; use the SDK's connection")
            group = groups.get(proc.group)
            return Caller(pid, uid, gid, proc, proc.group, group.privileges if group else frozenset())
        if descends_from(pid, self._pid):
            raise EPERM(f"pid {pid} is a descendant of an agent, not an agent; only agents make syscalls")
        if uid in (self._uid, 0):
            return Caller(pid, uid, gid, None, "admin", groups["admin"].privileges)
        raise EACCES(f"uid {uid} is not served by this kernel")

    def forget(self, proc) -> None:
        """Drop cached callers of an ended process."""
        for key in [k for k, c in self._callers.items() if c.proc is proc]:
            del self._callers[key]

    def close(self) -> None:
        self.sock.close(linger=0)
