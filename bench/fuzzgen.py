"""Hostile request frames for the syscall ABI (docs/abi.md), and the loop that sends them from inside an agent.

``Frames(seed, max_frame, self_id)`` is a seeded source of frames of eight kinds: random bytes, valid frames
truncated, valid frames with bits flipped, envelopes with wrong or missing ``v``/``id``/``call``/``args``,
frames near ``max_frame``, deeply nested lists and maps, every syscall with random arguments, and LLM calls
with random sampling parameters and random ``json_schema``\\ s.  ``drive(sock, frames, count)`` sends them on an
agent's own DEALER socket with a bounded number unanswered, and counts the answers by error code.

This file imports only the standard library and msgpack: bench/fuzz.py runs its source inside a fuzzer agent,
which cannot import ``bench/`` from its sandbox (Landlock grants it ``agentproc/``, ``syscalls/``,
``sandbox/`` only).  Frames stay below the hard limit (``2 x max_frame``): one past it would make libzmq drop
the connection, and a sandboxed agent cannot reconnect (docs/sandbox.md).  The fuzzer never sends a frame
that would kill itself (``proc.kill`` of its own id) or hold a follow stream on its own log open until it
exits (``proc.logs`` with ``follow``): both would end or stall the run, not test the kernel.
"""
from __future__ import annotations

import collections
import math
import random
import struct
import time

import msgpack

# Every syscall in syscalls/table.py (tests/escape/test_fuzz.py checks that the two agree).
SYSCALLS = ("sys.ping", "sys.shutdown", "sys.status", "sys.metrics", "proc.self", "proc.ready", "proc.list",
            "proc.kill", "proc.spawn", "proc.logs", "proc.trace", "llm.generate", "llm.chat", "llm.cancel", "llm.models",
            "storage.put", "storage.get", "storage.stat", "storage.list", "storage.delete", "storage.versions",
            "storage.rollback", "memory.add", "memory.get", "memory.list", "memory.delete", "memory.search",
            "memory.stats", "access.grant", "access.revoke", "access.list", "access.pending", "access.decide",
            "tool.list", "tool.call", "tool.next", "tool.done", "tool.register")
KEYS = ("a", "notes/today.md", "../x", "/etc/passwd", "a/../../b", "a//b", "a/", ".", "..", ".aiosd/m", "a\x00b",
        "a\\b", "", "x" * 1025, "/".join(["d"] * 40), "\u202e", "ü/名前")
LLM_CALLS = ("llm.generate", "llm.chat")
KINDS = {  # kind -> weight
    "bytes": 12, "truncated": 12, "bitflip": 18, "envelope": 12, "huge": 3, "nested": 5, "syscall": 22,
    "llm": 16,
}
SANE_TOKENS = 4  # max_tokens of well-formed generations: the model must not be the bottleneck
INTS = (0, 1, -1, 2, 7, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63,
        2**64 - 1, -2**31, -2**63)
FLOATS = (0.0, -0.0, 0.5, 1.0, 1e-300, 5e-324, 1e308, -1e308, math.inf, -math.inf, math.nan)
PATTERNS = ("^a+$", "(", ")", "[", "]", "a{2,3}", "a{1000}", "a{1001}", "a{0,1000}", "(a|b)*c", r"\d{3}-\d{4}",
            "^(?=a)b$", "(?!x)y", "\\", r"[^\]]", "a**", "{5}", r"\p{L}", "(" * 200 + ")" * 200, "." * 1024,
            "a?" * 500, "(a{1000}){1000}", "((a{1000}){1000}){1000}", "[z-a]", "\x00", "\udcff", "$^", "")
NASTY = ("\x00", "\n", "\u202e", "\ufeff", "\U0001F600", "\\", '"', "{", "a", "\x7f", "\u0301")
FORMATS = ("date", "date-time", "time", "uuid", "email", "uri", "bogus", "")
SCHEMA_TYPES = ("string", "integer", "number", "boolean", "null", "object", "array", ["string", "null"], "weird",
                5, None)
REFS = ("#", "#/definitions/a", "#/$defs/a", "#/nope", "#/properties/a", "https://example.com/s.json", "a", "")


class Raw(bytes):
    """Bytes put into a frame as they are (a hand-made msgpack value)."""


_packer = msgpack.Packer(unicode_errors="surrogateescape")  # "\udcXX" in a str becomes the invalid byte XX


def pack(obj) -> bytes:
    """msgpack of ``obj``; ``Raw`` values and ``Pairs`` maps (duplicate or odd keys) are spliced in as given, and
    integers past msgpack's range become floats."""
    if isinstance(obj, Raw):
        return bytes(obj)
    if isinstance(obj, dict):
        obj = Pairs(list(obj.items()))
    if isinstance(obj, Pairs):
        n = max(0, obj.count) if obj.count is not None else len(obj.items)
        return map_header(n) + b"".join(pack(k) + pack(v) for k, v in obj.items)
    if isinstance(obj, (list, tuple)):
        return array_header(len(obj)) + b"".join(pack(v) for v in obj)
    if isinstance(obj, int) and not -2**63 <= obj < 2**64:
        obj = float(obj)
    return _packer.pack(obj)


class Pairs:
    """A msgpack map written pair by pair: keys may repeat or be of any type; ``count`` may lie."""

    def __init__(self, items: list, count: int | None = None):
        self.items, self.count = items, count


def map_header(n: int) -> bytes:
    return bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n) if n < 65536 else \
        b"\xdf" + struct.pack(">I", n & 0xFFFFFFFF)


def array_header(n: int) -> bytes:
    return bytes([0x90 | n]) if n < 16 else b"\xdc" + struct.pack(">H", n) if n < 65536 else \
        b"\xdd" + struct.pack(">I", n & 0xFFFFFFFF)


def ext(code: int, data: bytes) -> Raw:
    """An ext value of any type code, negative ones (msgpack's reserved range: -1 is a timestamp) included."""
    fixed = {1: b"\xd4", 2: b"\xd5", 4: b"\xd6", 8: b"\xd7", 16: b"\xd8"}
    head = fixed.get(len(data), b"\xc7" + bytes([len(data) & 0xFF]))
    return Raw(head + struct.pack(">b", code) + data)


class Frames:
    """A seeded source of hostile frames.  ``next()`` -> (kind, id, frame): ``id`` is the unique request id the
    frame was built with (``None`` when it has none, or a garbage one), so an answer can be traced to it."""

    def __init__(self, seed: int, max_frame: int, self_id: int | None = None):
        self.r = random.Random(seed)
        self.max_frame = max_frame
        self.hard_cap = 2 * max_frame - 1  # past 2 x max_frame libzmq drops the connection
        self.self_id = self_id
        self.rid = 0
        self.filtered = 0  # frames generated but not sent: they would have killed or stalled the fuzzer
        self._kinds, self._weights = list(KINDS), list(KINDS.values())

    def next(self) -> tuple[str, int | None, bytes]:
        while True:
            kind = self.r.choices(self._kinds, self._weights)[0]
            self.rid += 1
            rid, frame = getattr(self, "_" + kind)()
            frame = frame[:self.hard_cap]
            if self.harmless(frame):
                return kind, rid, frame
            self.filtered += 1

    def harmless(self, frame: bytes) -> bool:
        """False for a frame the kernel could read as ``proc.kill`` of the fuzzer itself, or as a follow stream
        of its own log (both would end or stall the run)."""
        try:
            obj = msgpack.unpackb(frame, strict_map_key=False)
        except Exception:  # noqa: BLE001 -- unreadable here is unreadable to the kernel too
            return True
        if not isinstance(obj, dict) or not isinstance(obj.get("args"), dict):
            return True
        call, args = obj.get("call"), obj["args"]
        if call not in ("proc.kill", "proc.logs") or args.get("id") != self.self_id:
            return True
        return call == "proc.logs" and not args.get("follow")

    # ---- values ----------------------------------------------------------------------------------------------

    def chance(self, p: float) -> bool:
        return self.r.random() < p

    def text(self, n: int | None = None) -> str:
        """A string: ASCII, any Unicode, NULs, controls, or (one in twenty) invalid UTF-8 (surrogate escapes)."""
        r = self.r
        n = r.choice((0, 1, 3, 8, 16, 64, 300)) if n is None else n
        alphabet = r.choices(("ascii", "unicode", "nasty", "badutf8"), (55, 25, 15, 5))[0]
        if alphabet == "ascii":
            return bytes(b % 95 + 32 for b in r.randbytes(n)).decode()
        if alphabet == "unicode":
            return "".join(map(chr, (r.choice((r.randint(0x80, 0xD7FF), r.randint(0xE000, 0x10FFFF)))
                                     for _ in range(n))))
        if alphabet == "nasty":
            return "".join(r.choices(NASTY, k=n))
        return bytes(b % 95 + 32 for b in r.randbytes(n)).decode() + "\udcff\udcc0"[:r.randint(1, 2)]

    def value(self, depth: int = 0):
        """Any msgpack value: edge-case integers and floats, strings, bytes, ext types, containers."""
        r = self.r
        pick = r.randrange(11 if depth < 3 else 8)
        if pick == 0:
            return r.choice(INTS)
        if pick == 1:
            return r.randint(-2**63, 2**64 - 1)
        if pick == 2:
            return r.choice(FLOATS) if self.chance(0.7) else r.uniform(-1e6, 1e6)
        if pick == 3:
            return self.text()
        if pick == 4:
            return r.randbytes(r.choice((0, 1, 16, 300)))
        if pick == 5:
            return r.choice((True, False, None))
        if pick == 6:
            return ext(r.randint(-128, 127), r.randbytes(r.choice((0, 1, 4, 8, 12, 30))))
        if pick == 7:
            return r.choice(("", "v", "id", "call", "args", "sys.ping", "llm.generate", "prompt"))
        if pick == 8:
            return [self.value(depth + 1) for _ in range(r.randint(0, 5))]
        if pick == 9:
            return Pairs([(self.key(), self.value(depth + 1)) for _ in range(r.randint(0, 5))])
        return {self.text(r.randint(0, 8)): self.value(depth + 1) for _ in range(r.randint(0, 4))}

    def key(self):
        """A map key: usually a string, sometimes an integer, bytes, nil or a float."""
        return self.text(self.r.randint(0, 10)) if self.chance(0.8) else self.r.choice((1, -1, b"id", None, 1.5))

    def either(self, sane, p: float = 0.6):
        """``sane()`` with probability ``p``, else a random value."""
        return sane() if self.chance(p) else self.value()

    # ---- envelopes -------------------------------------------------------------------------------------------

    def envelope(self, call: str, args, rid: int | None = None) -> bytes:
        rid = self.rid if rid is None else rid
        items = [("v", 1), ("id", rid), ("call", call)]
        if args is not None:
            items.append(("args", args))
        return pack(Pairs(items))

    def request(self) -> tuple[int, bytes]:
        """A frame the kernel can decode: a real syscall with arguments of its schema (or close to it)."""
        name = self.r.choice(SYSCALLS)
        return self.rid, self.envelope(name, self.args(name))

    # ---- arguments -------------------------------------------------------------------------------------------

    def pid(self) -> int:
        return self.r.choice((0, 1, 2, 3, 4, 5, self.r.randint(1, 64), 2**31, 2**63 - 1, -1))

    def args(self, name: str):
        """Arguments for syscall ``name``: its fields (each present or not, sane or random), maybe an unknown
        field, sometimes not a map at all."""
        r = self.r
        if self.chance(0.05):
            return self.value()
        fields = self.fields(name)
        args = {k: v() for k, v in fields.items() if self.chance(0.8)}
        if self.chance(0.1):
            args[self.text(r.randint(1, 12))] = self.value()
        return args

    def fields(self, name: str) -> dict:
        """Field name -> maker of a value for it (mostly within the schema of syscalls/schemas.py)."""
        r, e = self.r, self.either
        if name in ("proc.kill", "proc.logs"):
            f = {"id": lambda: e(self.pid, 0.9)}
            if name == "proc.logs":
                f.update(follow=lambda: e(lambda: r.random() < 0.5, 0.9), stream=lambda: e(lambda: r.random() < 0.5, 0.9))
            return f
        if name == "proc.trace":
            return {"id": lambda: e(self.pid, 0.9), "after": lambda: e(lambda: r.choice(INTS), 0.8),
                    "discard": lambda: e(lambda: r.random() < 0.5, 0.9)}
        if name == "llm.cancel":
            return {"id": lambda: e(lambda: r.choice((0, self.rid - 1, self.rid - 5, 2**63 - 1, 2**63)), 0.8)}
        if name == "proc.ready":
            return {"layers": lambda: e(lambda: {self.text(5): self.text(10) for _ in range(r.randint(0, 40))})}
        if name == "proc.spawn":
            return {"source": lambda: e(lambda: "print('spawned')"), "group": lambda: e(lambda: "admin"),
                    "name": lambda: e(self.text), "argv": lambda: e(lambda: [self.text() for _ in range(3)]),
                    "filename": lambda: e(lambda: r.choice(("a.py", "../x", "", "a/b"))),
                    "limits": lambda: e(lambda: {"memory_mb": r.choice(INTS), "syscall_rate": r.choice(INTS)}),
                    "trace": lambda: e(lambda: r.random() < 0.5, 0.9),
                    "venv": lambda: e(lambda: r.choice(("/", "/etc", "../venv", "/tmp/v" * 800))),
                    "files": lambda: e(lambda: {r.choice(("a.py", "../x", "/etc/x", ".rc", "d/" * 20 + "x")):
                                                self.text() for _ in range(r.randint(0, 300))})}
        if name in LLM_CALLS:
            return self.sampling(name)
        if name.startswith("storage."):
            return self.storage_fields(name)
        if name.startswith("memory."):
            return self.memory_fields(name)
        if name == "tool.call":  # python would run the fuzz's code: the cheap tools only (they still validate)
            return {"name": lambda: self.r.choice(("calculator", "text", "clock", "nope", "", self.value())),
                    "args": lambda: self.either(lambda: self.r.choice((
                        {"expression": self.r.choice(("1+2", "2**99999", "__import__('os')", "1/0", ""))},
                        {"op": self.r.choice(("count", "upper", "find", "x")), "text": self.text(),
                         "pattern": self.r.choice(("a", "(", "(a+)+$"))},
                        {"utc_offset_minutes": self.r.choice((0, 60, 100000, "x"))})), 0.8)}
        if name == "tool.done":
            return {"job": lambda: self.r.choice((1, 2, 0, -1)), "result": self.value, "error": self.text}
        if name == "tool.register":  # a worker's call: agents get EPERM, whatever the tools
            return {"tools": lambda: [{"name": self.text(), "input_schema": self.value()}],
                    "final": lambda: self.either(lambda: self.r.random() < 0.5, 0.9)}
        if name.startswith("access."):
            return {"to": lambda: self.r.choice(("other", "group:default", "group:", "", self.text())),
                    "mode": lambda: self.r.choice(("read", "read-write", "write", 1)),
                    "prefix": lambda: self.r.choice(("", "notes/", "../", "a//", self.text())),
                    "id": lambda: self.r.choice((1, 2, 0, -1, 2**63)),
                    "approve": lambda: self.either(lambda: self.r.random() < 0.5, 0.9),
                    "namespace": lambda: self.r.choice((None, "someone-else"))}
        return {}  # NoArgs: any field is unknown

    def memory_fields(self, name: str) -> dict:
        """Fields of the memory calls: texts and queries of every kind, metadata maps and filters with odd
        values, ids of anyone, edge k and limits."""
        r, e = self.r, self.either
        meta = lambda: e(lambda: {self.text(r.randint(0, 8)): r.choice((self.text(), 1, 1.5, True, None, [1]))  # noqa: E731
                                  for _ in range(r.choice((0, 1, 3, 33)))}, 0.8)
        f = {"namespace": lambda: r.choice((None, None, "other-agent", "", self.value()))}
        if name == "memory.add":
            f.update(text=lambda: e(lambda: self.text(r.choice((1, 20, 300, 5000))), 0.9), metadata=meta)
        elif name in ("memory.get", "memory.delete"):
            f.update(id=lambda: e(lambda: r.choice((1, 2, 17, 0, -1, 2**63 - 1, 2**63)), 0.9))
        elif name == "memory.list":
            f.update(after=lambda: r.choice((0, 5, -1, 2**63)), limit=lambda: r.choice((1, 100, 1000, 1001, 0)),
                     filter=meta)
        elif name == "memory.search":
            f.update(query=lambda: e(lambda: self.text(r.choice((0, 3, 50, 5000))), 0.9),
                     k=lambda: r.choice((1, 5, 100, 101, 0, -1)), filter=meta,
                     mode=lambda: r.choice(("hybrid", "embedding", "keyword", "sql", 1)))
        return f

    def storage_fields(self, name: str) -> dict:
        """Fields of the storage calls: hostile keys, other namespaces, edge offsets, versions and sizes."""
        r, e = self.r, self.either
        version = lambda: r.choice((0, 1, 2, 17, -1, 2**63 - 1, 2**63))  # noqa: E731
        f = {"key": lambda: e(lambda: r.choice(KEYS), 0.9),
             "namespace": lambda: r.choice((None, "other-agent", "", "x" * 65, self.value()))}
        if name == "storage.put":
            f.update(data=lambda: e(lambda: r.randbytes(r.choice((0, 1, 100, 4000))), 0.8),
                     content_type=lambda: r.choice((None, "text/plain", "", "x" * 256, "a\x00b")),
                     if_version=version, offset=lambda: r.choice((0, 0, 1, 100, -1, 2**63)),
                     final=lambda: e(lambda: r.random() < 0.7, 0.9))
        elif name == "storage.get":
            f.update(version=version, offset=lambda: r.choice((0, 5, 2**40, -1)),
                     length=lambda: r.choice((None, 0, 10, 2**62, -5)))
        elif name == "storage.list":
            del f["key"]
            f.update(prefix=lambda: r.choice(("", "a", "notes/", "%", self.text())), after=lambda: self.text(3),
                     limit=lambda: r.choice((1, 100, 1000, 1001, 0, -1)))
        elif name == "storage.delete":
            f.update(if_version=version, purge=lambda: e(lambda: r.random() < 0.5, 0.9))
        elif name == "storage.rollback":
            f.update(version=version, if_version=version)
        return f

    def sampling(self, name: str) -> dict:
        """Fields of ``llm.generate`` / ``llm.chat``: edge values of every sampling parameter, random schemas."""
        r, e = self.r, self.either
        f = {"max_tokens": lambda: e(lambda: r.randint(1, SANE_TOKENS), 0.9) if self.chance(0.9) else
             r.choice((0, -1, 4097, 2**63, 1.0, None)),
             "temperature": lambda: r.choice((0.0, 0.0, 0.7, 1.5, 100.0, 100.1, -1.0, math.nan, math.inf, 0, 1,
                                              "0.5", None, 1e-300)),
             "top_k": lambda: r.choice((0, 1, 40, 2**20, 2**20 + 1, -1, 2**40, 2**63 - 1, 2**64 - 1, 3.0)),
             "top_p": lambda: r.choice((1.0, 0.95, 0.5, 1e-300, 0.0, 1.0000001, -math.inf, math.nan, 1)),
             "seed": lambda: r.choice((None, 0, 42, 2**32 - 1, 2**32, -1, 2**64 - 1, True)),
             "stop": lambda: r.choice(([], ["\n"], [""], ["a"] * 9, [self.value()], ["x" * 257], "\n", [self.text()])),
             "stream": lambda: e(lambda: r.random() < 0.5, 0.9),
             "model": lambda: r.choice((None, "default", "", "nope", "x" * 65, self.value())),
             "json_schema": lambda: None if self.chance(0.4) else self.schema()}
        if name == "llm.generate":
            f["prompt"] = lambda: e(self.prompt, 0.9)
        else:
            f["messages"] = lambda: e(self.messages, 0.85)
            f["tools"] = lambda: None if self.chance(0.7) else r.choice((
                ["calculator"], ["text", "clock"], ["nope"], [], [{"name": "own", "parameters": self.schema()}],
                [{"name": 5}], ["calculator"] * 40, self.value()))
            f["tool_choice"] = lambda: r.choice((None, "auto", "required", "none", {"name": "calculator"}, "x", 5))
        return f

    def prompt(self) -> str:
        r = self.r
        if self.chance(0.05):  # far over the per-sequence context: tokenized, then E2BIG
            return (self.text(64) or "x") * r.randint(64, max(64, self.max_frame // 300))
        return r.choice(("Once upon a time", "The capital of France is", "", "\x00", "{")) + self.text(r.randint(0, 8))

    def messages(self) -> list:
        r = self.r
        roles = ("system", "user", "assistant", "tool", "", None, 1)
        return [{"role": r.choice(roles[:3]) if self.chance(0.9) else r.choice(roles),
                 "content": self.either(lambda: self.text(r.randint(0, 20)), 0.9)}
                for _ in range(r.choice((0, 1, 2, 3, 257)))]

    # ---- json_schema -----------------------------------------------------------------------------------------

    def bound(self):
        return self.r.choice((0, 1, 5, 1000, 1001, 2**31 - 1, 10**30, -1, 1.5, "10", None, 3))

    def schema(self, depth: int = 0):
        """A random JSON Schema: every type, bounds at and past the limits (docs/abi.md 7), patterns, enums,
        refs (recursive, dangling, remote), combinators, deep chains; sometimes not a map."""
        r = self.r
        if depth == 0 and self.chance(0.08):
            return r.choice(([], "string", 5, True, [{"type": "string"}]))
        if depth == 0 and self.chance(0.08):
            return self.chain(r.choice((8, 30, 31, 32, 33, 40, 100)))
        if depth > 4 or self.chance(0.15):
            return r.choice(({"type": "string"}, {"type": "integer"}, {}, {"$ref": r.choice(REFS)}, True, False,
                             {"const": self.json()}))
        s: dict = {"type": r.choice(SCHEMA_TYPES)} if self.chance(0.85) else {}
        extra = r.randint(0, 4)
        for _ in range(extra):
            s.update(self.schema_keyword(depth))
        return s

    def schema_keyword(self, depth: int) -> dict:
        r = self.r
        pick = r.randrange(12)
        if pick == 0:
            return {r.choice(("minLength", "maxLength")): self.bound(), "pattern": r.choice(PATTERNS)}
        if pick == 1:
            return {"format": r.choice(FORMATS)}
        if pick == 2:
            return {r.choice(("minimum", "maximum", "exclusiveMinimum", "multipleOf")): r.choice(INTS + (1.5, -0.0))}
        if pick == 3:
            names = [self.text(r.randint(0, 6)) for _ in range(r.randint(0, 5))]
            return {"properties": {n: self.schema(depth + 1) for n in names},
                    "required": names + ([self.text(3)] if self.chance(0.3) else []),
                    "additionalProperties": r.choice((True, False, {"type": "integer"}))}
        if pick == 4:
            return {"items": self.schema(depth + 1), r.choice(("minItems", "maxItems")): self.bound(),
                    "uniqueItems": r.choice((True, False))}
        if pick == 5:
            return {"prefixItems": [self.schema(depth + 1) for _ in range(r.randint(0, 3))]}
        if pick == 6:
            n = r.choice((0, 1, 3, 1024, 1025, 3000))
            return {"enum": [self.json() for _ in range(n)] if n < 8 else [f"e{i}" for i in range(n)]}
        if pick == 7:
            return {"const": self.json()}
        if pick == 8:
            return {r.choice(("anyOf", "oneOf", "allOf")): [self.schema(depth + 1) for _ in range(r.randint(0, 3))]}
        if pick == 9:
            return {"$ref": r.choice(REFS), r.choice(("definitions", "$defs")): {"a": self.schema(depth + 1)}}
        if pick == 10:
            return {"not": self.schema(depth + 1)}
        return {r.choice(("minProperties", "maxProperties", "minContains")): self.bound()}

    def chain(self, depth: int) -> dict:
        """A schema nested ``depth`` levels deep (arrays of arrays, or anyOf in anyOf)."""
        key = self.r.choice(("items", "anyOf", "properties"))
        node: dict = {"type": "integer"}
        for _ in range(depth):
            node = {"type": "array", "items": node} if key == "items" else \
                {"anyOf": [node]} if key == "anyOf" else {"type": "object", "properties": {"a": node}}
        return node

    def json(self):
        """A JSON-ish value for enum and const entries (with the odd non-JSON one)."""
        r = self.r
        return r.choice((self.text(r.randint(0, 6)), r.choice(INTS[:12]), r.choice(FLOATS), True, None,
                         [1, "a"], {"k": "v"}))

    # ---- the frame kinds -------------------------------------------------------------------------------------

    def _bytes(self):
        r = self.r
        n = r.choice((0, 1, 2, 5, 16, 64, 256, 1024, 4096))
        head = r.choice((b"", b"\x84", b"\x81\xa1v", b"\xde\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc1", b"\x91"))
        return None, head + r.randbytes(n)

    def _truncated(self):
        rid, frame = self.request()
        return None, frame[:self.r.randrange(max(1, len(frame)))]

    def _bitflip(self):
        rid, frame = self.llm() if self.chance(0.3) else self.request()
        data = bytearray(frame)
        for _ in range(self.r.choice((1, 1, 2, 3, 8))):
            data[self.r.randrange(len(data))] ^= 1 << self.r.randrange(8)
        return rid, bytes(data)

    def _envelope(self):
        """The envelope's keys missing, mistyped, out of range, repeated, or joined by unknown ones."""
        r = self.r
        wrong = {"v": (0, 2, -1, "1", 1.0, True, None, 2**64 - 1, [1]),
                 "id": (-1, 2**63, 2**64 - 1, 1.0, "1", None, True, [], {}),
                 "call": ("", "sys", "SYS.PING", "sys.ping\x00", "x" * 300, 1, None, b"sys.ping", ["sys.ping"],
                          "sys.\udcffping"),
                 "args": ([], "x", 1, None, True, [{}], b"\x80", Raw(b"\xc1"))}
        right = {"v": 1, "id": self.rid, "call": r.choice(SYSCALLS), "args": {}}
        items = []
        for key in ("v", "id", "call", "args"):
            if self.chance(0.15):
                continue  # missing
            value = r.choice(wrong[key]) if self.chance(0.4) else right[key]
            items.append((key, value))
            if self.chance(0.05):
                items.append((key, r.choice(wrong[key])))  # repeated
        if self.chance(0.2):
            items.append((self.key(), self.value()))
        r.shuffle(items)
        count = len(items) + r.choice((-1, 1)) if self.chance(0.05) else None
        return None, pack(Pairs(items, count))

    def _huge(self):
        """A frame of about ``max_frame`` bytes (at, just under, just over, up to the hard limit)."""
        r = self.r
        target = r.choice((self.max_frame - 1, self.max_frame, self.max_frame + 1,
                           r.randint(self.max_frame // 2, self.hard_cap)))
        where = r.choice(("prompt", "call", "key", "source", "bin", "content"))
        fill = (self.text(16) or "a") * (target // 16 + 1)
        size = target - 60
        for _ in range(3):  # converge on the target size
            frame = self._huge_frame(where, fill[:max(0, size)])
            size += target - len(frame)
        return self.rid, frame

    def _huge_frame(self, where: str, s: str) -> bytes:
        if where == "prompt":
            return self.envelope("llm.generate", {"prompt": s, "max_tokens": 1})
        if where == "call":
            return self.envelope(s, {})
        if where == "key":
            return self.envelope("sys.ping", {s: 1})
        if where == "source":
            return self.envelope("proc.spawn", {"source": s})
        if where == "bin":
            return self.envelope("sys.ping", {"b": s.encode("utf-8", "surrogateescape")})
        return self.envelope("llm.chat", {"messages": [{"role": "user", "content": s}], "max_tokens": 1})

    def _nested(self):
        """Lists or maps nested thousands deep: the whole frame, the args, a json_schema, a chat message."""
        r = self.r
        depth = r.choice((100, 1000, 10000, 30000, self.max_frame // 4))
        unit, leaf = r.choice(((b"\x91", b"\xc0"), (b"\x81\xa1a", b"\x80"), (b"\x81\xa5items", b"\x80")))
        nest = Raw((unit * depth)[:self.max_frame - 200] + leaf)
        where = r.randrange(4)
        if where == 0:
            return None, bytes(nest)
        if where == 1:
            return self.rid, self.envelope(r.choice(SYSCALLS), nest)
        if where == 2:
            return self.rid, self.envelope("llm.generate", {"prompt": "x", "max_tokens": 1, "json_schema": nest})
        return self.rid, self.envelope("llm.chat", {"messages": [{"role": "user", "content": nest}]})

    def _syscall(self):
        return self.request()

    def _llm(self):
        return self.llm()

    def llm(self) -> tuple[int, bytes]:
        """An LLM call: half with every argument random, half well-formed but for a random json_schema (so
        that schemas reach the grammar converter and llama.cpp's parser)."""
        name = self.r.choice(LLM_CALLS)
        if self.chance(0.5):
            return self.rid, self.envelope(name, self.args(name))
        args = {"max_tokens": self.r.randint(1, SANE_TOKENS), "temperature": self.r.choice((0.0, 0.7)),
                "stream": self.chance(0.5), "json_schema": self.schema()}
        if name == "llm.generate":
            args["prompt"] = self.prompt()
        else:
            args["messages"] = [{"role": "user", "content": self.text(self.r.randint(1, 20))}]
        return self.rid, self.envelope(name, args)


class Tally:
    """What came back: final answers by error code (``ok`` for success), chunks, malformed answers, and the
    frames that got ``EIO`` (a kernel bug) with the last frames sent before each, to replay."""

    def __init__(self):
        self.sent = 0
        self.answered = 0
        self.chunks = 0
        self.malformed = 0
        self.codes: collections.Counter = collections.Counter()
        self.kinds: collections.Counter = collections.Counter()
        self.eio: list[dict] = []
        self.waiting: collections.OrderedDict = collections.OrderedDict()  # id -> (kind, frame) unanswered
        self.recent: collections.deque = collections.deque(maxlen=8)

    def sending(self, kind: str, rid: int | None, frame: bytes) -> None:
        self.sent += 1
        self.kinds[kind] += 1
        self.recent.append((kind, frame))
        if rid is not None:
            self.waiting[rid] = (kind, frame)
            if len(self.waiting) > 4096:  # ids garbled in flight are never answered by them
                self.waiting.popitem(last=False)

    def received(self, data: bytes) -> bool:
        """Count one message from the kernel; True if it ends a request (a reply, not a chunk)."""
        try:
            msg = msgpack.unpackb(data, strict_map_key=False)
        except Exception:  # noqa: BLE001 -- the kernel sent something that is not msgpack
            self.malformed += 1
            return False
        if not isinstance(msg, dict) or msg.get("v") != 1:
            self.malformed += 1
            return False
        if "seq" in msg:
            self.chunks += 1
            return False
        self.answered += 1
        code = "ok" if msg.get("ok") is True else (msg.get("error") or {}).get("code")
        if code is None or (code == "ok") != ("result" in msg):
            self.malformed += 1
        self.codes[str(code)] += 1
        sent = self.waiting.pop(msg.get("id"), None)
        if code == "EIO" and len(self.eio) < 10:
            self.eio.append(self.sample(msg, sent))
        return True

    def sample(self, msg: dict, sent) -> dict:
        """An EIO answer and the frame it answers (or, when its id is unreadable, the last frames sent)."""
        frames = [sent] if sent else list(self.recent)
        return {"id": msg.get("id"), "message": (msg.get("error") or {}).get("message"),
                "frames": [{"kind": k, "len": len(f), "hex": f[:2048].hex()} for k, f in frames]}

    def summary(self, seconds: float, filtered: int) -> dict:
        return {"sent": self.sent, "answered": self.answered, "unanswered": self.sent - self.answered,
                "chunks": self.chunks, "malformed": self.malformed, "codes": dict(self.codes),
                "kinds": dict(self.kinds), "eio": self.codes.get("EIO", 0), "eio_samples": self.eio,
                "filtered": filtered, "seconds": seconds, "frames_per_s": self.sent / max(seconds, 1e-9)}


def drive(sock, frames: Frames, count: int, *, window: int = 32, stuck_s: float = 60.0,
          progress_every: int = 0) -> dict:
    """Send ``count`` frames on ``sock`` (a connected DEALER), at most ``window`` unanswered; wait for every
    answer (up to ``stuck_s`` of silence); return the ``Tally`` summary.  Prints ``PROGRESS n`` every
    ``progress_every`` frames (0: never)."""
    tally, t0 = Tally(), time.monotonic()
    in_flight = 0
    for n in range(count):
        while in_flight >= window or sock.poll(0):
            if not sock.poll(int(stuck_s * 1000)):
                break  # no answer for stuck_s: count what is missing rather than wait forever
            in_flight -= tally.received(sock.recv())
        if in_flight >= window:
            break
        kind, rid, frame = frames.next()
        tally.sending(kind, rid, frame)
        sock.send(frame)
        in_flight += 1
        if progress_every and (n + 1) % progress_every == 0:
            print("PROGRESS", n + 1, flush=True)
    while in_flight > 0 and sock.poll(int(stuck_s * 1000)):
        in_flight -= tally.received(sock.recv())
    return tally.summary(time.monotonic() - t0, frames.filtered)
