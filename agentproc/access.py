"""Sharing an agent's storage and memory by grant (docs/abi.md, "Access").

    from agentproc import access, storage
    g = access.grant("writer", mode="read", prefix="notes/")   # agent "writer" may read notes/...
    ...                                                         # it reads: storage.get("notes/a", namespace="researcher")
    access.revoke(g["id"])

A grant names another agent (its launch name) or a privilege group (``"group:NAME"``), ``read`` or
``read-write``, on the whole namespace (``prefix=""``, memory included) or on the storage keys starting with
``prefix``.  Only a namespace's owner grants on it.  Every use of a grant, and every refusal, is audited.
"""
from __future__ import annotations

from agentproc.client import Client, default
from agentproc.records import Grant


def grant(to: str, *, mode: str = "read", prefix: str = "", client: Client | None = None) -> Grant:
    """Let ``to`` (an agent name or ``"group:NAME"``) ``mode`` ("read" or "read-write") this agent's namespace,
    or its storage keys under ``prefix``.  Returns the grant (with its ``id``); ``EINVAL`` for a bad ``to``,
    ``mode`` or ``prefix``, or one's own name."""
    return Grant((client or default()).call("access.grant", {"to": to, "mode": mode, "prefix": prefix}))


def revoke(grant_id: int, *, client: Client | None = None) -> Grant:
    """Take grant ``grant_id`` back; from now on its grantee is refused (EACCES).  ``ENOENT`` unless it is a
    grant on this agent's namespace.  Returns the grant as it was, with ``revoked: True``."""
    return Grant((client or default()).call("access.revoke", {"id": grant_id}))


def list(*, client: Client | None = None) -> dict[str, list[Grant]]:  # noqa: A001
    """``{"granted": [grants on this namespace], "received": [grants to this agent or its group]}``."""
    out = (client or default()).call("access.list", {})
    return {k: [Grant(g) for g in v] if k in ("granted", "received") else v for k, v in out.items()}
