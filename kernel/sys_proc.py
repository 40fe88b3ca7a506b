"""Handlers of the ``sys.*`` and ``proc.*`` syscalls (docs/abi.md 4), as xv6's ``sysproc.c``.

Each handler takes the kernel, the call (which carries the authenticated caller) and the decoded arguments,
calls one manager -- the process table (``kernel/proc.py``) through the kernel -- and returns the result, or
``DEFERRED`` when the answer comes later through the call (log streams).  ``syscalls/table.py`` names them;
the router dispatches to them and nothing else calls them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from kernel.router import DEFERRED, Call
from syscalls import schemas as S
from syscalls.errors import ENOENT, EPERM
from syscalls.table import ADMIN

if TYPE_CHECKING:
    from kernel.kernel import Kernel
    from kernel.proc import Proc

LOGS_REPLY_CHARS = 64 << 10  # proc.logs without stream answers with the last this many characters (docs/abi.md)


def target(k: "Kernel", call: Call, pid: int) -> "Proc":
    """The process ``pid`` if the caller may act on it (admin, or itself); EPERM / ENOENT otherwise.

    Permission is checked first, so a non-admin cannot probe which ids exist.
    """
    caller = call.caller
    if ADMIN not in caller.privileges and (caller.proc is None or caller.proc.id != pid):
        raise EPERM(f"process {pid} is not yours; only the admin group may act on other processes")
    return k.procs.get(pid)


def sys_ping(k: "Kernel", call: Call, args: S.NoArgs):
    return {"pong": True}


def sys_shutdown(k: "Kernel", call: Call, args: S.NoArgs):
    k.request_shutdown(f"requested by {call.caller.describe()}")
    return {"ok": True}


def sys_status(k: "Kernel", call: Call, args: S.NoArgs):
    return k.status()


def sys_metrics(k: "Kernel", call: Call, args: S.NoArgs):
    """The kernel's Prometheus metrics, in the text exposition format (kernel/metrics.py)."""
    return {"text": k.metrics.render().decode()}


def proc_self(k: "Kernel", call: Call, args: S.NoArgs):
    record = dict(call.caller.record(), max_frame=k.config.kernel.max_frame)
    if call.caller.proc is not None and k.storage is not None:
        used = k.storage.usage_now(call.caller.proc.name)
        record["usage"].update(storage_bytes=used["bytes"], storage_keys=used["keys"])
    return record


def proc_ready(k: "Kernel", call: Call, args: S.Ready):
    k.attest(call.caller, dict(args.layers))
    return {"ok": True}


def proc_list(k: "Kernel", call: Call, args: S.NoArgs):
    caller = call.caller
    if ADMIN in caller.privileges:
        procs = k.procs.all()
    else:
        procs = [caller.proc] if caller.proc is not None else []
    return {"procs": [p.record() for p in procs]}


def proc_kill(k: "Kernel", call: Call, args: S.Kill):
    proc = target(k, call, args.id)
    k.signal(proc, args.signal, call.caller.describe())
    return proc.record()


def proc_spawn(k: "Kernel", call: Call, args: S.Spawn):
    return k.spawn(args, owner=call.caller).record()


def proc_logs(k: "Kernel", call: Call, args: S.Logs):
    proc = target(k, call, args.id)
    if not args.stream:
        text = proc.output.text()
        truncated = len(text) > LOGS_REPLY_CHARS
        return {"output": text[-LOGS_REPLY_CHARS:] if truncated else text, "truncated": truncated,
                **{f: proc.record()[f] for f in ("state", "exit_status", "reason")}}
    k.follow_logs(proc, call, follow=args.follow)
    return DEFERRED


def proc_trace(k: "Kernel", call: Call, args: S.Trace):
    """A page of agent ``args.id``'s syscall trace (kernel/trace.py); admin only (the table says so)."""
    proc = k.procs.get(args.id)
    if proc.trace is None:
        raise ENOENT(f"agent {proc.id} is not traced (spawn it with trace: true, `aiosctl run --trace`), or its "
                     "trace was discarded")
    page = proc.trace.page(args.after, k.config.kernel.max_frame // 2)
    if args.discard:
        k.traces.discard(proc)
    return {"id": proc.id, "name": proc.name, "state": proc.record()["state"], **page}
