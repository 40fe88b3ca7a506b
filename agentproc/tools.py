"""Tools for agents: ``tools.call("calculator", expression="2+2")`` (docs/abi.md, "Tools").

    from agentproc import tools
    print(tools.call("calculator", expression="17 * 23")["value"])
    print(tools.call("python", code="sum(range(10))")["result"])
    for t in tools.list():
        print(t["name"], t["description"])

A tool runs outside the kernel in a sandboxed worker; its arguments are checked against its JSON schema first
(``EINVAL`` naming the field).  ``ETOOL``: the tool failed (raised, crashed, or was killed over a limit: the
message says which); ``ETIMEDOUT``: it ran past its time limit; ``EAGAIN``: its queue is full.
"""
from __future__ import annotations

from agentproc.client import Client, default
from agentproc.records import Tool


def list(*, client: Client | None = None) -> list[Tool]:  # noqa: A001
    """Every tool this agent's group may use: ``name``, ``description``, ``parameters`` (JSON Schema),
    ``limits``."""
    return [Tool(t) for t in (client or default()).call("tool.list")["tools"]]


def call(name: str, arguments: dict | None = None, /, *, client: Client | None = None, **args):
    """Run tool ``name`` with ``args`` (keywords, or a map as the second argument: for an argument called
    ``client``, or names that are not Python identifiers) and return its result."""
    return (client or default()).call("tool.call", {"name": name, "args": {**(arguments or {}), **args}})["result"]
