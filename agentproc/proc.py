"""Process syscalls for agents (docs/abi.md 4): who am I, who else (as far as I may see), kill."""
from __future__ import annotations

from agentproc.client import Client, default


def self(client: Client | None = None) -> dict:  # noqa: A001 - the syscall's name
    """proc.self: this process's record (id, name, group, limits, usage...)."""
    return (client or default()).call("proc.self")


def list(client: Client | None = None) -> list:  # noqa: A001
    """proc.list: the process records this caller may see."""
    return (client or default()).call("proc.list")["procs"]


def kill(pid: int, client: Client | None = None) -> dict:
    """proc.kill: kill process ``pid`` (an agent may only kill itself unless its group has admin)."""
    return (client or default()).call("proc.kill", {"id": pid})
