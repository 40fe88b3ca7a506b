"""The syscall table: name -> (handler, argument schema, privilege).  docs/abi.md section 4 is its spec.

As in xv6's ``syscall.c`` the table is the one place that shows every syscall's path.  Handlers are thin:
they take the kernel, the call (which carries the authenticated caller) and decoded arguments, call one
manager, and return the result, or ``DEFERRED`` when the manager will answer through the call later
(streams, LLM generations).  The router decodes, checks privilege and dispatches through ``TABLE``; nothing
else does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import msgspec

from syscalls import schemas as S
from syscalls.errors import EPERM

DEFERRED = object()  # a handler's "the answer comes later through the call"
LOGS_REPLY_CHARS = 64 << 10  # proc.logs without stream answers with the last this many characters (docs/abi.md)

# Privileges (docs/abi.md section 5).
BASIC, PROC, LLM, ADMIN = "basic", "proc", "llm", "admin"
PRIVILEGES = (BASIC, PROC, LLM, ADMIN)


@dataclass(frozen=True)
class Syscall:
    name: str
    handler: Callable[[Any, Any, Any], Any]
    schema: type[S.Args]
    privilege: str
    decoder: msgspec.msgpack.Decoder = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "decoder", msgspec.msgpack.Decoder(self.schema))


def _target(k, call, pid: int):
    """The process ``pid`` if the caller may act on it (admin, or itself); EPERM / ENOENT otherwise.

    Permission is checked first, so a non-admin cannot probe which ids exist.
    """
    caller = call.caller
    if ADMIN not in caller.privileges and (caller.proc is None or caller.proc.id != pid):
        raise EPERM(f"process {pid} is not yours; only the admin group may act on other processes")
    return k.procs.get(pid)


def sys_ping(k, call, args: S.NoArgs):
    return {"pong": True}


def sys_shutdown(k, call, args: S.NoArgs):
    k.request_shutdown(f"requested by {call.caller.describe()}")
    return {"ok": True}


def sys_status(k, call, args: S.NoArgs):
    return k.status()


def proc_self(k, call, args: S.NoArgs):
    return call.caller.record()


def proc_ready(k, call, args: S.Ready):
    k.attest(call.caller, dict(args.layers))
    return {"ok": True}


def proc_list(k, call, args: S.NoArgs):
    caller = call.caller
    if ADMIN in caller.privileges:
        procs = k.procs.all()
    else:
        procs = [caller.proc] if caller.proc is not None else []
    return {"procs": [p.record() for p in procs]}


def proc_kill(k, call, args: S.ProcId):
    proc = _target(k, call, args.id)
    k.kill(proc, f"killed by {call.caller.describe()}")
    return proc.record()


def proc_spawn(k, call, args: S.Spawn):
    return k.spawn(args, owner=call.caller).record()


def proc_logs(k, call, args: S.Logs):
    proc = _target(k, call, args.id)
    if not args.stream:
        text = proc.output.text()
        truncated = len(text) > LOGS_REPLY_CHARS
        return {"output": text[-LOGS_REPLY_CHARS:] if truncated else text, "truncated": truncated,
                **{f: proc.record()[f] for f in ("state", "exit_status", "reason")}}
    k.follow_logs(proc, call, follow=args.follow)
    return DEFERRED


def llm_generate(k, call, args: S.Generate):
    k.llm_submit(call, args.prompt, args)
    return DEFERRED


def llm_chat(k, call, args: S.Chat):
    messages = [{"role": m.role, "content": m.content} for m in args.messages]
    k.llm_submit(call, None, args, messages=messages)
    return DEFERRED


def llm_cancel(k, call, args: S.Cancel):
    # Keyed by the caller's connection: a caller can only ever name its own requests.
    return {"cancelled": k.llm_cancel(call, args.id)}


TABLE: dict[str, Syscall] = {
    s.name: s
    for s in (
        Syscall("sys.ping", sys_ping, S.NoArgs, BASIC),
        Syscall("sys.shutdown", sys_shutdown, S.NoArgs, ADMIN),
        Syscall("sys.status", sys_status, S.NoArgs, ADMIN),
        Syscall("proc.self", proc_self, S.NoArgs, BASIC),
        Syscall("proc.ready", proc_ready, S.Ready, BASIC),
        Syscall("proc.list", proc_list, S.NoArgs, PROC),
        Syscall("proc.kill", proc_kill, S.ProcId, PROC),
        Syscall("proc.spawn", proc_spawn, S.Spawn, ADMIN),
        Syscall("proc.logs", proc_logs, S.Logs, PROC),
        Syscall("llm.generate", llm_generate, S.Generate, LLM),
        Syscall("llm.chat", llm_chat, S.Chat, LLM),
        Syscall("llm.cancel", llm_cancel, S.Cancel, LLM),
    )
}
