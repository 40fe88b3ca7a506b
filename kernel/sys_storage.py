"""Handlers of the ``storage.*`` syscalls (docs/abi.md, "Storage"), as xv6's ``sysfile.c``.

Each handler decides whose namespace the call names (``namespace``).  Writes run on the storage worker, the
one writer, and ``Kernel.offload`` answers them once committed: an fsync never stalls the event loop, and an
agent's writes queue behind at most one of each other agent's.  Reads are answered at once, on the event loop:
the manager reads through its own connection beside the writer (WAL), never waits for a commit, and returns
at most ``max_read`` bytes or ``list``'s limit of entries (measured: ~20-60 µs each).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from kernel.router import DEFERRED, Call
from kernel.storage import MB
from syscalls import schemas as S
from syscalls.errors import EACCES, EINVAL

if TYPE_CHECKING:
    from kernel.kernel import Kernel


def namespace(call: Call, asked: str | None) -> str:
    """The namespace a call acts on: an agent's own (its launch name; naming another is EACCES until the
    access manager grants it), or the one an operator names (EINVAL when it names none)."""
    proc = call.caller.proc
    if proc is None:
        if asked is None:
            raise EINVAL("operators must name a namespace (an agent's launch name): add \"namespace\"")
        return asked
    if asked is not None and asked != proc.name:
        raise EACCES(f"namespace {asked!r} is not yours (yours is {proc.name!r}); sharing needs a grant")
    return proc.name


def quotas(call: Call) -> dict:
    """The caller's storage quotas as the managers take them (None: unlimited, e.g. operators).  The storage
    and memory of a namespace share them: each manager is given them less what the other one holds."""
    limits = call.caller.proc.limits if call.caller.proc is not None else {}
    mb, keys = limits.get("storage_mb"), limits.get("storage_keys")
    return {"quota_bytes": mb * MB if mb else None, "quota_keys": keys or None}


def less(quota: int | None, used: int) -> int | None:
    return None if quota is None else max(0, quota - used)


def storage_quotas(k: "Kernel", ns: str, q: dict) -> dict:
    """``quotas`` less what the namespace's memory holds (read when the write runs)."""
    used = k.memory.usage_now(ns) if k.memory is not None else {"bytes": 0, "entries": 0}
    return {"quota_bytes": less(q["quota_bytes"], used["bytes"]), "quota_keys": less(q["quota_keys"], used["entries"])}


def storage_put(k: "Kernel", call: Call, args: S.StoragePut):
    if not isinstance(args.data, (bytes, str)):
        raise EINVAL(f"data must be bin or str, not {type(args.data).__name__}")
    ns, q = namespace(call, args.namespace), quotas(call)
    k.offload(call, lambda: k.storage.put(ns, args.key, args.data, content_type=args.content_type,
                                          if_version=args.if_version, offset=args.offset, final=args.final,
                                          **storage_quotas(k, ns, q)))
    return DEFERRED


def storage_get(k: "Kernel", call: Call, args: S.StorageGet):
    return k.storage.get(namespace(call, args.namespace), args.key, version=args.version, offset=args.offset,
                         length=args.length)


def storage_stat(k: "Kernel", call: Call, args: S.StorageKey):
    return k.storage.stat(namespace(call, args.namespace), args.key)


def storage_list(k: "Kernel", call: Call, args: S.StorageList):
    return k.storage.list(namespace(call, args.namespace), args.prefix, after=args.after, limit=args.limit)


def storage_delete(k: "Kernel", call: Call, args: S.StorageDelete):
    ns = namespace(call, args.namespace)
    k.offload(call, lambda: k.storage.delete(ns, args.key, if_version=args.if_version, purge=args.purge))
    return DEFERRED


def storage_versions(k: "Kernel", call: Call, args: S.StorageKey):
    return k.storage.versions(namespace(call, args.namespace), args.key)


def storage_rollback(k: "Kernel", call: Call, args: S.StorageRollback):
    ns, q = namespace(call, args.namespace), quotas(call)
    k.offload(call, lambda: k.storage.rollback(ns, args.key, args.version, if_version=args.if_version,
                                               **storage_quotas(k, ns, q)))
    return DEFERRED
