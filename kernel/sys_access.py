"""Handlers of the ``access.*`` syscalls (docs/abi.md, "Access"): grants on one's own namespace, and the
operators' view of requests waiting for confirmation.  The manager is kernel/access.py."""
from __future__ import annotations

from typing import TYPE_CHECKING

from kernel.router import Call
from syscalls import schemas as S
from kernel.tools import TOOL_GROUP
from syscalls.errors import EACCES, EINVAL, EPERM

if TYPE_CHECKING:
    from kernel.kernel import Kernel


def _owned(call: Call, asked: str | None) -> str:
    """The namespace whose grants the caller manages: its own (another's is EACCES: only owners grant), or the
    one an operator names."""
    proc = call.caller.proc
    if proc is None:
        if asked is None:
            raise EINVAL("operators must name the namespace whose grants they manage: add \"namespace\"")
        return asked
    if proc.group == TOOL_GROUP:
        raise EPERM("tool workers manage no grants")
    if asked is not None and asked != proc.name:
        raise EACCES(f"only the owner of namespace {asked!r} may manage its grants")
    return proc.name


def access_grant(k: "Kernel", call: Call, args: S.AccessGrant):
    ns = _owned(call, args.namespace)
    grant = k.grants.add(ns, args.prefix, args.to, args.mode, call.caller.describe())
    k.audit.append(call.caller.describe(), "access.grant", "granted", **grant.record())
    return grant.record()


def access_revoke(k: "Kernel", call: Call, args: S.AccessRevoke):
    owner = None if call.caller.proc is None else _owned(call, None)
    grant = k.grants.remove(args.id, owner)
    k.audit.append(call.caller.describe(), "access.revoke", "revoked", **grant.record())
    return {"revoked": True, **grant.record()}


def access_list(k: "Kernel", call: Call, args: S.AccessList):
    proc = call.caller.proc
    if proc is None:
        if args.namespace is None:
            raise EINVAL("operators must name a namespace: add \"namespace\"")
        return {"granted": [g.record() for g in k.grants.of(owner=args.namespace)],
                "received": [g.record() for g in k.grants.of(grantee=args.namespace)]}
    ns = _owned(call, args.namespace)
    return {"granted": [g.record() for g in k.grants.of(owner=ns)],
            "received": [g.record() for g in k.grants.of(grantee=ns, group=proc.group)]}


def access_pending(k: "Kernel", call: Call, args: S.NoArgs):
    return {"pending": [w.record() for w in sorted(k.pending.waiting.values(), key=lambda w: w.id)]}


def access_decide(k: "Kernel", call: Call, args: S.AccessDecide):
    return k.decide(args.id, args.approve, call.caller.describe())
