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
from kernel.tools import TOOL_GROUP
from syscalls import schemas as S
from syscalls.errors import EACCES, EINVAL

if TYPE_CHECKING:
    from kernel.kernel import Kernel


def principal(k: "Kernel", call: Call):
    """Whose rights a storage or memory call uses: the calling agent's (None for operators).  A tool worker has
    none of its own: while it runs a call of a tool that acts for its caller (the storage tool), it has that
    caller's -- its namespace, grants and quotas, never the worker's or the kernel's (the confused deputy);
    otherwise EACCES."""
    proc = call.caller.proc
    if proc is None or proc.group != TOOL_GROUP:
        return proc
    job = k.tools.job_of(proc)
    if job is None or not job.tool.acts_for_caller or job.call.caller.proc is None:
        raise EACCES("a tool reaches storage only for the agent whose call it runs (tools that act for their "
                     "caller, e.g. the storage tool)")
    return job.call.caller.proc


def namespace(k: "Kernel", call: Call, asked: str | None, *, key: str | None = None, write: bool = False,
              what: str = "") -> str:
    """The namespace a call acts on: an agent's own (its launch name), another only through a grant that covers
    ``key`` (a storage key or list prefix; None: the whole namespace) for reading or, with ``write``, writing
    (kernel/access.py; EACCES otherwise, and the decision is audited); operators name any, and must name one."""
    proc = principal(k, call)
    if proc is None:
        if asked is None:
            raise EINVAL("operators must name a namespace (an agent's launch name): add \"namespace\"")
        return asked
    if asked is None or asked == proc.name:
        return proc.name
    grant = k.grants.allowed(proc.name, proc.group, asked, key, write)
    k.audit.append(call.caller.describe(), what, "allowed" if grant else "denied", namespace=asked, key=key,
                   write=write, grant=grant.id if grant else None)
    if grant is None:
        need = "read-write" if write else "read"
        raise EACCES(f"namespace {asked!r} is not yours (yours is {proc.name!r}) and no grant gives you {need} "
                     f"on {'its key ' + repr(key) if key is not None else 'all of it'}; its owner can "
                     "grant it (access.grant)")
    return asked


def confirmed(k: "Kernel", call: Call, ns: str, what: str, *, delete: bool = False, overwrite: bool = False,
              run) -> object:
    """``run()`` now, or -- when ``[access] confirm`` names a kind this call is (a delete, an overwrite of a
    key that has versions, a write into another agent's namespace) -- once an operator approves it.  Operators'
    own calls never wait.  Returns what the handler returns (``DEFERRED``)."""
    policy, proc = k.config.access.confirm, principal(k, call)
    reasons = []
    if proc is not None:
        if delete and "delete" in policy:
            reasons.append("a delete")
        if overwrite and "overwrite" in policy:
            reasons.append("an overwrite of a versioned key")
        if ns != proc.name and "cross_write" in policy:
            reasons.append(f"a write into namespace {ns!r}")
    if reasons:
        k.confirm(call, what, " and ".join(reasons), run)
    else:
        run()
    return DEFERRED


def quotas(k: "Kernel", call: Call) -> dict:
    """The caller's storage quotas as the managers take them (None: unlimited, e.g. operators).  The storage
    and memory of a namespace share them: each manager is given them less what the other one holds."""
    proc = principal(k, call)
    limits = proc.limits if proc is not None else {}
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
    ns = namespace(k, call, args.namespace, key=args.key, write=True, what=f"storage.put {args.key!r}")
    q = quotas(k, call)
    job = lambda: k.storage.put(ns, args.key, args.data, content_type=args.content_type,  # noqa: E731
                                if_version=args.if_version, offset=args.offset, final=args.final,
                                **storage_quotas(k, ns, q))
    overwrite = args.final and "overwrite" in k.config.access.confirm and k.storage.exists(ns, args.key)
    return confirmed(k, call, ns, f"storage.put {args.key!r} in {ns!r}", overwrite=overwrite,
                     run=lambda: k.offload(call, job))


def storage_get(k: "Kernel", call: Call, args: S.StorageGet):
    return k.storage.get(namespace(k, call, args.namespace, key=args.key, what=f"storage.get {args.key!r}"), args.key, version=args.version, offset=args.offset,
                         length=args.length)


def storage_stat(k: "Kernel", call: Call, args: S.StorageKey):
    return k.storage.stat(namespace(k, call, args.namespace, key=args.key, what=f"storage.stat {args.key!r}"),
                          args.key)


def storage_list(k: "Kernel", call: Call, args: S.StorageList):
    ns = namespace(k, call, args.namespace, key=args.prefix or None, what=f"storage.list {args.prefix!r}")
    return k.storage.list(ns, args.prefix, after=args.after, limit=args.limit)


def storage_delete(k: "Kernel", call: Call, args: S.StorageDelete):
    ns = namespace(k, call, args.namespace, key=args.key, write=True, what=f"storage.delete {args.key!r}")
    job = lambda: k.storage.delete(ns, args.key, if_version=args.if_version, purge=args.purge)  # noqa: E731
    return confirmed(k, call, ns, f"storage.delete {args.key!r} in {ns!r}{' (purge)' if args.purge else ''}",
                     delete=True, run=lambda: k.offload(call, job))


def storage_versions(k: "Kernel", call: Call, args: S.StorageKey):
    return k.storage.versions(namespace(k, call, args.namespace, key=args.key,
                                        what=f"storage.versions {args.key!r}"), args.key)


def storage_rollback(k: "Kernel", call: Call, args: S.StorageRollback):
    ns = namespace(k, call, args.namespace, key=args.key, write=True, what=f"storage.rollback {args.key!r}")
    q = quotas(k, call)
    job = lambda: k.storage.rollback(ns, args.key, args.version, if_version=args.if_version,  # noqa: E731
                                     **storage_quotas(k, ns, q))
    return confirmed(k, call, ns, f"storage.rollback {args.key!r} to v{args.version} in {ns!r}", overwrite=True,
                     run=lambda: k.offload(call, job))
