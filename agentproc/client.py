"""The syscall client: one DEALER connection to the kernel, requests in, replies and chunks out.

Agents get a ready connection from the bootstrap (``default()``); operators and tests build their own with
``Client(endpoint)`` or ``connect(runtime_dir)``.

A ``Client`` is shared safely by any number of threads and asyncio tasks, each with requests in flight: after
boot an agent's sandbox allows no new connection, so everything multiplexes its one socket.  Whoever waits for
an answer reads the socket for everybody (leader/follower: one thread at a time holds the socket, the others
sleep until their answer is delivered); a thread that wants to send while another holds the socket queues its
frame and wakes the holder through a pipe.  Coroutines (``acall``, ``astream``) never block their event loop:
a reader thread, started the first time one waits, takes the socket for them.  Why not ``zmq.asyncio``: a
ZeroMQ socket must be driven from one thread at a time, so a second, asyncio socket over the same connection
would make the blocking API unusable beside it.
"""
from __future__ import annotations

import collections
import os
import threading
import time
from typing import Any, AsyncIterator, Iterator

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

class _Unset:
    """The default of ``timeout=`` arguments: the client's own timeout (``None`` would mean wait forever)."""

    def __repr__(self) -> str:
        return "<the client's timeout>"


_UNSET: Any = _Unset()
_default: "Client | None" = None


class Client:
    """A connection to the kernel.  ``timeout`` (seconds, None = wait forever) bounds every wait for an answer;
    a wait that runs out raises ETIMEDOUT.  Without ``routing_id`` the client presents the operator credential
    when it can read it (the kernel's user; docs/abi.md section 1); an agent's bootstrap passes its own.
    Thread-safe, and usable from asyncio (the ``a*`` methods) at the same time."""

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
        self._io = threading.Lock()  # whoever holds it may use self.sock
        self._state = threading.Condition()  # guards what follows; notified on every delivery and release
        self._next_id = 1
        self._inbox: dict[int, collections.deque] = {}
        self._outbox: collections.deque[bytes] = collections.deque()  # frames queued while the socket was busy
        self._async: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Event]] = {}
        self._reader: threading.Thread | None = None
        self._closed = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)

    # --- raw protocol --------------------------------------------------------------------------------
    def send(self, call: str, args: dict | None = None) -> int:
        """Send a request; return its id.  Read answers with ``next_message(id)`` (or ``anext_message``)."""
        with self._state:
            rid = self._next_id
            self._next_id += 1
            self._inbox[rid] = collections.deque()
        frame = encode_request(rid, call, args)
        if self._io.acquire(blocking=False):
            try:
                self._flush()
                self.sock.send(frame)
            finally:
                self._release()
            return rid
        with self._state:
            self._outbox.append(frame)
        try:
            os.write(self._wake_w, b"\0")  # the holder is polling: make it flush our frame now
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already
        if self._io.acquire(blocking=False):  # the holder let go before it saw our frame
            try:
                self._flush()
            finally:
                self._release()
        return rid

    def next_message(self, rid: int, timeout: float | None = _UNSET) -> dict:
        """The next answer (chunk or reply) for request ``rid``, buffering answers to other requests."""
        timeout = self.timeout if timeout is _UNSET else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._state:
                msg = self._take(rid)
                if msg is not None:
                    return msg
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    raise ETIMEDOUT(f"no answer from the kernel at {self.endpoint} within {timeout} s")
                leader = self._io.acquire(blocking=False)
                if not leader:
                    self._state.wait(wait)  # a delivery or a release wakes us
                    continue
            try:
                self._pump(wait, rid)
            finally:
                self._release()

    def discard(self, rid: int) -> None:
        """Forget request ``rid``: answers still to come for it are dropped on arrival (a stream left early)."""
        with self._state:
            self._inbox.pop(rid, None)

    async def anext_message(self, rid: int, timeout: float | None = _UNSET) -> dict:
        """As ``next_message``, without blocking the running event loop."""
        import asyncio  # here, not at the top: already loaded in a coroutine, and 30 ms of every agent's start

        timeout = self.timeout if timeout is _UNSET else timeout
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        ready = asyncio.Event()
        try:
            while True:
                with self._state:
                    msg = self._take(rid)
                    if msg is not None:
                        return msg
                    ready.clear()
                    self._async[rid] = (loop, ready)
                    self._start_reader()
                    self._state.notify_all()
                wait = None if deadline is None else deadline - loop.time()
                try:
                    await asyncio.wait_for(ready.wait(), wait)
                except (TimeoutError, asyncio.TimeoutError):
                    raise ETIMEDOUT(f"no answer from the kernel at {self.endpoint} within {timeout} s") from None
        finally:
            with self._state:
                self._async.pop(rid, None)

    def _take(self, rid: int) -> dict | None:
        """Pop the next answer for ``rid`` if one is there (``_state`` held); a reply ends the request."""
        box = self._inbox[rid]
        if not box:
            return None
        msg = box.popleft()
        if "seq" not in msg:
            del self._inbox[rid]
        return msg

    def _pump(self, wait: float | None, rid: int | None) -> None:
        """Holding the socket: send what is queued, wait up to ``wait`` s for answers and deliver them.  An
        error reply without an id (the kernel could not read a request's id) goes to ``rid``, the one waited on."""
        self._flush()
        ready = dict(self._poller.poll(None if wait is None else int(wait * 1000) + 1))
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            self._flush()
        if self.sock not in ready:
            return
        got = []
        while True:
            try:
                got.append(self.sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
        with self._state:
            for raw in got:
                self._deliver(raw, rid)
            self._state.notify_all()

    def _deliver(self, raw: bytes, rid: int | None) -> None:
        try:
            msg = msgpack.unpackb(raw, raw=False)
        except (ValueError, msgpack.UnpackException):
            return  # not from a kernel speaking this ABI; nothing to match it to
        if not isinstance(msg, dict):
            return
        other = msg.get("id")
        if other is None and "error" in msg:
            other = rid
        if other in self._inbox:
            self._inbox[other].append(msg)
            waiter = self._async.get(other)
            if waiter is not None:
                waiter[0].call_soon_threadsafe(waiter[1].set)

    def _flush(self) -> None:
        """Send the frames other threads queued (socket held)."""
        while self._outbox:
            with self._state:
                frame = self._outbox.popleft() if self._outbox else None
            if frame is not None:
                self.sock.send(frame)

    def _release(self) -> None:
        """Let go of the socket; if a frame was queued meanwhile and nobody holds it, send it first."""
        while True:
            with self._state:
                self._io.release()
                self._state.notify_all()
                if not self._outbox or not self._io.acquire(blocking=False):
                    return
            self._flush()

    def _start_reader(self) -> None:
        """Start the thread that reads for coroutines (``_state`` held)."""
        if self._reader is None:
            self._reader = threading.Thread(target=self._read_for_coroutines, name="aiosd-client", daemon=True)
            self._reader.start()

    def _read_for_coroutines(self) -> None:
        while True:
            with self._state:
                while not self._async and not self._closed:
                    self._state.wait()
                if self._closed:
                    return
                if not self._io.acquire(blocking=False):
                    self._state.wait(0.5)  # a thread is reading: it delivers to coroutines too
                    continue
            try:
                self._pump(0.5, None)
            finally:
                self._release()

    # --- calls ---------------------------------------------------------------------------------------
    def call(self, call: str, args: dict | None = None, *, timeout: float | None = _UNSET) -> Any:
        """Make a syscall and return its result; raises the ABI error as an exception (agentproc.errors)."""
        rid = self.send(call, args)
        while True:
            msg = self.next_message(rid, timeout)
            if "seq" not in msg:
                return result_of(msg)

    async def acall(self, call: str, args: dict | None = None, *, timeout: float | None = _UNSET) -> Any:
        """``call`` for coroutines: ``await client.acall("sys.ping")``; many may be in flight at once."""
        rid = self.send(call, args)
        while True:
            msg = await self.anext_message(rid, timeout)
            if "seq" not in msg:
                return result_of(msg)

    def stream(self, call: str, args: dict | None = None, *, timeout: float | None = _UNSET) -> "Stream":
        """Make a streaming syscall: iterate the chunks; afterwards ``.result`` holds the final result."""
        return Stream(self, self.send(call, dict(args or {}, stream=True)), timeout)

    def astream(self, call: str, args: dict | None = None, *, timeout: float | None = _UNSET) -> "AStream":
        """``stream`` for coroutines: ``async for chunk in client.astream(...)``."""
        return AStream(self, self.send(call, dict(args or {}, stream=True)), timeout)

    def close(self) -> None:
        """Close the connection and stop its reader thread; no call may be made on it afterwards."""
        with self._state:
            self._closed = True
            self._state.notify_all()
        if self._reader is not None:
            self._reader.join(2.0)
        self.sock.close(linger=0)
        self._ctx.term()
        os.close(self._wake_r)
        os.close(self._wake_w)

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
        return self._step(self.client.next_message(self.rid, self.timeout), StopIteration)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        return self._step(await self.client.anext_message(self.rid, self.timeout), StopAsyncIteration)

    def _step(self, msg: dict, stop: type[Exception]) -> Any:
        if "seq" in msg:
            if msg["seq"] != self._seq:
                raise EPROTO(f"chunk {msg['seq']} arrived where chunk {self._seq} was due")
            self._seq += 1
            return msg["chunk"]
        self._done = True
        self.result = result_of(msg)
        raise stop


AStream = Stream  # one class: iterate it with ``for`` in a thread or ``async for`` in a coroutine


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
    """Make ``client`` the process's connection (``default()``); the bootstrap installs the agent's own."""
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
