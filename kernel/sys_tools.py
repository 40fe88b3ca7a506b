"""Handlers of the ``tool.*`` syscalls (docs/abi.md, "Tools"): agents list and call tools; the kernel's tool
workers take jobs and hand back results.  The manager is kernel/tools.py."""
from __future__ import annotations

from typing import TYPE_CHECKING

from kernel.router import DEFERRED, Call
from kernel.tools import permits
from syscalls import schemas as S
from syscalls.errors import EPERM, SyscallError

if TYPE_CHECKING:
    from kernel.kernel import Kernel


def allowed(k: "Kernel", call: Call) -> frozenset | None:
    """The tools the caller's group may call (``[groups.NAME] tools``); None: every tool."""
    group = k.config.groups.get(call.caller.group)
    return group.tools if group is not None else frozenset()


def tool_list(k: "Kernel", call: Call, args: S.NoArgs):
    """The caller's group's tools; right after boot, once the MCP servers have listed theirs (or failed)."""
    mine = allowed(k, call)
    if k.tools.starting():
        k.tools.when_listed(lambda: call.done or call.reply(k.tools.list(mine)))
        return DEFERRED
    return k.tools.list(mine)


def tool_call(k: "Kernel", call: Call, args: S.ToolCall):
    mine = allowed(k, call)
    who, what = call.caller.describe(), f"tool.call {args.name}"
    if not permits(mine, args.name):
        k.audit.append(who, what, "denied", reason="not in the group's tools")
        raise EPERM(f"group {call.caller.group!r} may not call tool {args.name!r} ([groups.{call.caller.group}] "
                    f"tools: {', '.join(sorted(mine)) or 'none'})")
    tool_args = dict(args.args)
    if k.tools.server_starting(args.name):  # right after boot: once its server has listed its tools
        k.tools.when_listed(lambda: call.done or _later(call, lambda: _queue(k, call, args, tool_args)))
        return DEFERRED
    return _queue(k, call, args, tool_args)


def _later(call: Call, step) -> None:
    """Run a deferred step of ``call``; an ABI error it raises is the call's answer."""
    try:
        step()
    except SyscallError as exc:
        call.fail(exc.code, exc.message)


def _queue(k: "Kernel", call: Call, args: S.ToolCall, tool_args: dict):
    who, what = call.caller.describe(), f"tool.call {args.name}"
    tool = k.tools.check(args.name, tool_args)  # before an operator is asked, and before it is queued

    def run():
        k.tools.call(call, args.name, tool_args)
        k.audit.append(who, what, "queued")

    if tool.confirm:
        k.confirm(call, what, f"MCP server {tool.pool!r} does not say this tool is read-only or harmless "
                              f"(hints {tool.hints or 'none'})", run)
    else:
        run()
    return DEFERRED


def _worker(call: Call):
    if call.caller.proc is None:
        raise EPERM("tool.next and tool.done are for the kernel's tool workers")
    return call.caller.proc


def tool_next(k: "Kernel", call: Call, args: S.NoArgs):
    k.tools.next(_worker(call), call)
    return DEFERRED


def tool_done(k: "Kernel", call: Call, args: S.ToolDone):
    k.tools.done(_worker(call), args.job, args.result, args.error)
    return {"ok": True}


def tool_register(k: "Kernel", call: Call, args: S.ToolRegister):
    return k.tools.register(_worker(call), list(args.tools), args.final)
