"""Process syscalls for agents (docs/abi.md 4): who am I, who else (as far as I may see), logs, kill, spawn.

    from agentproc import proc
    me = proc.self()
    print(me.name, me.group, me.usage["llm_tokens"])

Records are ``agentproc.records.Proc``: maps whose keys read as attributes too.
"""
from __future__ import annotations

from agentproc.client import Client, default
from agentproc.records import Proc


def self(*, client: Client | None = None) -> Proc:  # noqa: A001 - the syscall's name
    """proc.self: this process's record (id, name, group, limits, usage...)."""
    return Proc((client or default()).call("proc.self"))


def list(*, client: Client | None = None) -> list[Proc]:  # noqa: A001
    """proc.list: the process records this caller may see (only itself, unless its group has ``admin``)."""
    return [Proc(r) for r in (client or default()).call("proc.list")["procs"]]


def kill(pid: int, signal: str = "SIGKILL", *, client: Client | None = None) -> Proc:
    """proc.kill: kill process ``pid``, or send it ``signal`` (``"SIGTERM"``, ``"SIGUSR1"``...: docs/abi.md); an
    agent may only signal itself unless its group has ``admin``.  ``SIGKILL``, ``SIGTERM``, ``SIGINT`` and
    ``SIGQUIT`` also end its restart chain.  Returns the record as it stands once the signal is sent; ``ENOENT``
    for an unknown id, ``EINVAL`` for a signal the kernel does not send."""
    return Proc((client or default()).call("proc.kill", {"id": pid, "signal": signal}))


def logs(pid: int, *, client: Client | None = None) -> dict:
    """proc.logs: ``{"output", "truncated", "state", "exit_status"}``, the last 64 KiB process ``pid`` printed
    (non-admin callers: only their own)."""
    return (client or default()).call("proc.logs", {"id": pid})


def spawn(source: str, *, name: str | None = None, group: str = "default", client: Client | None = None,
          **args) -> Proc:
    """proc.spawn: start ``source`` (Python) as a new agent named ``name`` in ``group``; further ABI arguments
    (``argv``, ``limits``, ``filename``, ``fleet``, ``restart``...) pass as keywords.  Needs privilege ``admin`` (``EPERM``
    otherwise).  Returns the new record; wait for it with ``proc.list`` or ``proc.logs``."""
    call = {"source": source, "group": group, **args}
    if name is not None:
        call["name"] = name
    return Proc((client or default()).call("proc.spawn", call))
