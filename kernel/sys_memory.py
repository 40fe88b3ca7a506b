"""Handlers of the ``memory.*`` syscalls (docs/abi.md, "Memory").

Every call runs on the memory worker (``Kernel.offload``): an ``add`` fsyncs, a ``search`` embeds its query and
scores every entry of the namespace (milliseconds at 100k entries), so none of it may stall the event loop.
Memory lives in the same namespace as the agent's storage (its launch name) and counts against the same quotas:
its bytes against ``storage_mb``, its entries against ``storage_keys`` (docs/memory.md).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from kernel.router import DEFERRED, Call
from kernel.sys_storage import confirmed, less, namespace, quotas
from syscalls import schemas as S

if TYPE_CHECKING:
    from kernel.kernel import Kernel


def _offload(k: "Kernel", call: Call, job) -> object:
    k.offload(call, job, k.memory_worker)
    return DEFERRED


def memory_add(k: "Kernel", call: Call, args: S.MemoryAdd):
    ns = namespace(k, call, args.namespace, write=True, what="memory.add")
    q = quotas(k, call)

    def add():
        used = k.storage.usage_now(ns)  # storage's share of the namespace's quotas
        return k.memory.add(ns, args.text, args.metadata, quota_bytes=less(q["quota_bytes"], used["bytes"]),
                            quota_entries=less(q["quota_keys"], used["keys"]))
    return confirmed(k, call, ns, f"memory.add in {ns!r}", run=lambda: _offload(k, call, add))


def memory_get(k: "Kernel", call: Call, args: S.MemoryId):
    ns = namespace(k, call, args.namespace, what=f"memory.get {args.id}")
    return _offload(k, call, lambda: k.memory.get(ns, args.id))


def memory_list(k: "Kernel", call: Call, args: S.MemoryList):
    ns = namespace(k, call, args.namespace, what="memory.list")
    return _offload(k, call, lambda: k.memory.list(ns, after=args.after, limit=args.limit, filter=args.filter))


def memory_delete(k: "Kernel", call: Call, args: S.MemoryId):
    ns = namespace(k, call, args.namespace, write=True, what=f"memory.delete {args.id}")
    return confirmed(k, call, ns, f"memory.delete {args.id} in {ns!r}", delete=True,
                     run=lambda: _offload(k, call, lambda: k.memory.delete(ns, args.id)))


def memory_search(k: "Kernel", call: Call, args: S.MemorySearch):
    ns = namespace(k, call, args.namespace, what="memory.search")
    return _offload(k, call, lambda: k.memory.search(ns, args.query, args.k, filter=args.filter, mode=args.mode))


def memory_stats(k: "Kernel", call: Call, args: S.MemoryStats):
    ns = namespace(k, call, args.namespace, what="memory.stats")
    return _offload(k, call, lambda: dict(k.memory.stats(ns), usage=k.memory.usage(ns)))
