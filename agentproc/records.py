"""Typed results of the syscalls that answer with records (docs/abi.md): a ``dict`` whose keys also read as
attributes, so ``proc.self().usage`` and ``proc.self()["usage"]`` are the same value.

The annotations name the fields the ABI promises; a kernel newer than this SDK may add keys (docs/abi.md 6:
clients ignore what they do not know), and those read the same way.  A missing field raises
``AttributeError`` (attribute access) or ``KeyError`` (item access), never ``None`` by surprise.
"""
from __future__ import annotations


class Record(dict):
    """A syscall result map with attribute access to its keys."""

    __slots__ = ()

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no field {name!r} (fields: {sorted(self)})") from None


class Proc(Record):
    """A process record (``proc.self``, ``proc.list``, ``proc.kill``, ``proc.spawn``)."""

    id: int
    name: str
    group: str
    pid: int
    state: str                 # STARTING | RUNNING | EXITED | KILLED (and whatever states the kernel adds)
    started_at: float
    ended_at: float | None
    exit_status: int | None    # exit code, or minus the signal number
    reason: str | None         # why it was killed
    limits: dict               # effective limits, every key present
    usage: dict                # syscalls, prompt_tokens, completion_tokens, llm_tokens, and live samples
    layers: dict               # sandbox layer -> "on" | "on: detail" | "off: reason"
    fleet: str | None


class Grant(Record):
    """A grant on a namespace (``access.grant``, ``access.revoke``, ``access.list``)."""

    id: int
    namespace: str
    prefix: str
    to: str                    # an agent name or "group:NAME"
    mode: str                  # "read" | "read-write"
    created: float
    by: str


class Tool(Record):
    """A tool the caller may use (``tool.list``)."""

    name: str
    description: str
    parameters: dict           # JSON Schema of its arguments
    limits: dict


class Model(Record):
    """A model the kernel serves (``llm.models``)."""

    name: str
    default: bool              # the one that answers a request naming no model
    n_ctx_seq: int             # context per sequence, in tokens
    kind: str                  # "local" (the kernel runs it) or "openai" (a remote core: docs/remote.md)
