"""The syscall client: one DEALER connection to the kernel, requests in, replies and chunks out.

Agents get a ready connection from the bootstrap (``default()``); operators and tests build their own with
``Client(endpoint)`` or ``connect(runtime_dir)``.  A ``Client`` is for one thread.
"""
from __future__ import annotations

import collections
import os
import time
from typing import Any, Iterator

import msgpack
import zmq

from syscalls.address import ABI_VERSION, default_runtime_dir, endpoint, operator_routing_id
from syscalls.errors import EPROTO, ETIMEDOUT, error_for

# The SDK speaks the wire format with msgpack: agents import this on every start, and msgspec (the kernel's
# strict decoder) costs ~20 ms to import against msgpack's ~7 ms.
_packb = msgpack.Packer().pack


def encode_request(rid: int, call: str, args: dict | None = None) -> bytes:
    """A request envelope (docs/abi.md 2.1)."""
    msg = {"v": ABI_VERSION, "id": rid, "call": call}
    if args:
        msg["args"] = args
    return _packb(msg)

_UNSET: Any = object()
_default: "Client | None" = None


class Client:
    """A connection to the kernel.  ``timeout`` (seconds, None = wait forever) bounds every wait for an answer;
    a wait that runs out raises ETIMEDOUT.  Without ``routing_id`` the client presents the operator credential
    when it can read it (the kernel's user; docs/abi.md section 1); an agent's bootstrap passes its own."""

    def __init__(self, endpoint: str, *, routing_id: bytes | None = None, timeout: float | None = None):
        self.endpoint = endpoint
        self.timeout = timeout
        self._ctx = zmq.Context()
        self.sock = self._ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if routing_id is None:
            routing_id = operator_routing_id(endpoint)
        if routing_id is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        self.sock.connect(endpoint)
        self._next_id = 1
        self._inbox: dict[int, collections.deque] = {}

    # --- raw protocol --------------------------------------------------------------------------------
    def send(self, call: str, args: dict | None = None) -> int:
        """Send a request; return its id.  Read answers with ``next_message(id)``."""
        rid = self._next_id
        self._next_id += 1
        self._inbox[rid] = collections.deque()
        self.sock.send(encode_request(rid, call, args))
        return rid

    def next_message(self, rid: int, timeout: float | None = _UNSET) -> dict:
        """The next answer (chunk or reply) for request ``rid``, buffering answers to other requests."""
        timeout = self.timeout if timeout is _UNSET else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        box = self._inbox[rid]
        while not box:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self.sock.poll(None if wait is None else int(wait * 1000) + 1):
                raise ETIMEDOUT(f"no answer from the kernel at {self.endpoint} within {timeout} s")
            try:
                msg = msgpack.unpackb(self.sock.recv(), raw=False)
            except (ValueError, msgpack.UnpackException):
                continue  # not from a kernel speaking this ABI; nothing to match it to
            other = msg.get("id") if isinstance(msg, dict) else None
            if other in self._inbox:
                self._inbox[other].append(msg)
            elif other is None and isinstance(msg, dict) and "error" in msg:
                box.append(msg)  # the kernel could not read our request's id: it answers the one we wait for
        msg = box.popleft()
        if "seq" not in msg:
            del self._inbox[rid]
        return msg

    # --- calls ---------------------------------------------------------------------------------------
    def call(self, call: str, args: dict | None = None, *, timeout: float | None = _UNSET) -> Any:
        """Make a syscall and return its result; raises the ABI error as an exception (agentproc.errors)."""
        rid = self.send(call, args)
        while True:
            msg = self.next_message(rid, timeout)
            if "seq" not in msg:
                return result_of(msg)

    def stream(self, call: str, args: dict | None = None, *, timeout: float | None = _UNSET) -> "Stream":
        """Make a streaming syscall: iterate the chunks; afterwards ``.result`` holds the final result."""
        return Stream(self, self.send(call, dict(args or {}, stream=True)), timeout)

    def close(self) -> None:
        self.sock.close(linger=0)
        self._ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Stream:
    """Iterator over a streamed syscall's chunks, in order; ``result`` is set when the stream has ended."""

    def __init__(self, client: Client, rid: int, timeout):
        self.client, self.rid, self.timeout = client, rid, timeout
        self.result: Any = None
        self._seq = 0
        self._done = False

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        msg = self.client.next_message(self.rid, self.timeout)
        if "seq" in msg:
            if msg["seq"] != self._seq:
                raise EPROTO(f"chunk {msg['seq']} arrived where chunk {self._seq} was due")
            self._seq += 1
            return msg["chunk"]
        self._done = True
        self.result = result_of(msg)
        raise StopIteration


def result_of(msg: dict) -> Any:
    """The result of a reply, or the ABI error it carries raised as an exception."""
    if msg.get("ok"):
        return msg.get("result")
    err = msg.get("error") or {}
    raise error_for(str(err.get("code", "EIO")), str(err.get("message", "")))


def connect(runtime_dir: str | None = None, *, timeout: float | None = None) -> Client:
    """A client for the kernel serving ``runtime_dir`` (default: the same default as aiosd's)."""
    return Client(endpoint(runtime_dir or default_runtime_dir()), timeout=timeout)


def install_default(client: Client) -> None:
    global _default
    _default = client


def default() -> Client:
    """The process's connection: the agent's own (set by the bootstrap), else one to the default kernel."""
    global _default
    if _default is None:
        _default = connect(os.environ.get("AIOSD_RUNTIME_DIR"))
    return _default


def ping() -> dict:
    """sys.ping, the null syscall."""
    return default().call("sys.ping")
