"""Syscall traces: the kernel's record of what one agent did (docs/abi.md, "Syscall traces").

An agent spawned with ``trace: true`` (or every agent, with ``[kernel] trace_all``) gets a ``Trace``: each of
its syscalls becomes one entry -- call, arguments, result or error code, when it was made and how long it
took -- appended when its final answer leaves the kernel.  ``proc.trace`` (admin) reads it in pages.

Bounds (kernel memory is never the agent's to spend):

- each entry is bounded: strings past ``VALUE_CHARS`` characters, bytes, lists past ``VALUE_ITEMS`` items and
  nesting past ``DEPTH`` levels are cut; an entry still over ``ENTRY_MAX`` bytes keeps
  only the sizes of its arguments and result; and the entry's ``truncated`` names what was
  cut (``args``, ``result``);
- each trace holds at most ``[kernel] trace_kb``: past it the oldest entries go (``dropped`` counts them);
- all traces together hold at most ``[kernel] trace_total_mb``: a trace reserves its ``trace_kb`` when its
  agent is spawned; when the total is spent, the traces of ended agents are discarded, oldest first, and if
  that is not enough the spawn is refused (EAGAIN): tracing fails closed, it never runs untraced or unbounded.
"""
from __future__ import annotations

import collections
import time

import msgpack

from syscalls.errors import EAGAIN

VALUE_CHARS = 512   # characters of a string kept in an entry
VALUE_ITEMS = 64    # items of a list or map kept in an entry
DEPTH = 6           # nesting levels kept in an entry
ENTRY_OVERHEAD = 64  # bytes an entry costs beyond its packed size (the deque, the dict)
ENTRY_MAX = 16384    # bytes one entry may take (an eighth of the trace's budget if that is less); past it the
                     # values of its arguments and result are replaced by their size


def bounded(value, depth: int = 0) -> tuple[object, bool]:
    """``value`` cut to the trace's bounds, and whether anything was cut.  Bytes become ``{"bytes": N}``."""
    if isinstance(value, str):
        if len(value) > VALUE_CHARS:
            return value[:VALUE_CHARS] + f"...[{len(value) - VALUE_CHARS} more chars]", True
        return value, False
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": len(value)}, True
    if isinstance(value, (list, tuple, dict)) and depth >= DEPTH:
        return "...[nested too deep]", True
    if isinstance(value, (list, tuple)):
        cut = len(value) > VALUE_ITEMS
        items = []
        for v in value[:VALUE_ITEMS]:
            b, c = bounded(v, depth + 1)
            items.append(b)
            cut |= c
        return items, cut
    if isinstance(value, dict):
        cut = len(value) > VALUE_ITEMS
        out = {}
        for k, v in list(value.items())[:VALUE_ITEMS]:
            b, c = bounded(v, depth + 1)
            out[str(k)[:VALUE_CHARS]] = b
            cut |= c
        return out, cut
    if value is None or isinstance(value, (bool, int, float)):
        return value, False
    return repr(value)[:VALUE_CHARS], True


class Trace:
    """One agent's trace: entries oldest first, at most ``budget`` bytes of them."""

    def __init__(self, budget: int):
        self.budget = budget
        self.entry_max = max(1024, min(budget // 8, ENTRY_MAX))  # a trace holds at least 8 entries
        self.used = 0
        self.entries: collections.deque[tuple[int, dict]] = collections.deque()  # (size, entry)
        self.seq = 0
        self.dropped = 0
        self.t0 = time.perf_counter()

    def add(self, call: str, args, started: float, ok: bool, value, chunks: int = 0) -> None:
        """Append the entry of one answered syscall; ``value`` is its result (``ok``) or its error code.
        ``started``: ``time.perf_counter()`` when its frame was read."""
        now = time.perf_counter()
        self.seq += 1
        args_b, cut_a = bounded(args if args is not None else {})
        entry = {"seq": self.seq, "call": call[:64], "args": args_b,
                 "t": round(started - self.t0, 6), "ms": round((now - started) * 1000, 3), "ok": ok}
        if ok:
            entry["result"], cut_r = bounded(value)
        else:
            entry["error"], cut_r = str(value)[:32], False
        if chunks:
            entry["chunks"] = chunks
        if cut_a or cut_r:
            entry["truncated"] = ["args"] * cut_a + ["result"] * cut_r
        size = len(msgpack.packb(entry)) + ENTRY_OVERHEAD
        if size > self.entry_max:  # many items, each under the bounds: the entry keeps its shape, not its values
            for key in ("args", "result"):
                if key in entry:
                    entry[key] = f"...[{size} bytes cut]"
            entry["truncated"] = [k for k in ("args", "result") if k in entry]
            size = len(msgpack.packb(entry)) + ENTRY_OVERHEAD
        self.entries.append((size, entry))
        self.used += size
        while self.used > self.budget and self.entries:
            gone, _ = self.entries.popleft()
            self.used -= gone
            self.dropped += 1

    def page(self, after: int, max_bytes: int) -> dict:
        """Entries with ``seq > after``, oldest first, as many as fit in ``max_bytes`` (at least one);
        ``more`` tells whether others follow."""
        out, size, more = [], 0, False
        for cost, entry in self.entries:
            if entry["seq"] <= after:
                continue
            if out and size + cost > max_bytes:
                more = True
                break
            out.append(entry)
            size += cost
        return {"entries": out, "more": more, "dropped": self.dropped, "bytes": self.used,
                "budget": self.budget}


class Traces:
    """Every agent's trace and the total they may hold (``total`` bytes, reserved per trace at spawn)."""

    def __init__(self, per_trace: int, total: int):
        self.per_trace, self.total = per_trace, total
        self.reserved = 0
        self._owners: collections.OrderedDict = collections.OrderedDict()  # proc -> Trace, oldest first

    def make_room(self) -> None:
        """Make room for one more trace: ended agents' traces go, oldest first.  EAGAIN when the live ones hold
        the whole total (call it before spawning a traced agent: it then starts traced or not at all)."""
        if self.reserved + self.per_trace > self.total:
            for old in [p for p in self._owners if not p.alive]:
                self.discard(old)
                if self.reserved + self.per_trace <= self.total:
                    break
        if self.reserved + self.per_trace > self.total:
            raise EAGAIN(f"the kernel's trace memory is spent ({self.total >> 10} KiB held by "
                         f"{len(self._owners)} traced agents: [kernel] trace_total_mb); wait for traced "
                         "agents to end or raise it")

    def start(self, proc) -> Trace:
        """A trace for ``proc``, its ``per_trace`` bytes reserved (``make_room`` first; EAGAIN as there)."""
        self.make_room()
        trace = Trace(self.per_trace)
        self.reserved += self.per_trace
        self._owners[proc] = trace
        proc.trace = trace
        return trace

    def discard(self, proc) -> None:
        """Free ``proc``'s trace (nothing if it has none)."""
        trace = self._owners.pop(proc, None)
        if trace is not None:
            self.reserved -= trace.budget
            proc.trace = None

    def status(self) -> dict:
        return {"traces": len(self._owners), "reserved_bytes": self.reserved, "total_bytes": self.total}
