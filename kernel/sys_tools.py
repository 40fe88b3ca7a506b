"""Handlers of the ``tool.*`` syscalls (docs/abi.md, "Tools"): agents list and call tools; the kernel's tool
workers take jobs and hand back results.  The manager is kernel/tools.py."""
from __future__ import annotations

from typing import TYPE_CHECKING

from kernel.router import DEFERRED, Call
from syscalls import schemas as S
from syscalls.errors import EPERM

if TYPE_CHECKING:
    from kernel.kernel import Kernel


def allowed(k: "Kernel", call: Call) -> frozenset | None:
    """The tools the caller's group may call (``[groups.NAME] tools``); None: every tool."""
    group = k.config.groups.get(call.caller.group)
    return group.tools if group is not None else frozenset()


def tool_list(k: "Kernel", call: Call, args: S.NoArgs):
    mine = allowed(k, call)
    return {"tools": [t for t in k.tools.list() if mine is None or t["name"] in mine]}


def tool_call(k: "Kernel", call: Call, args: S.ToolCall):
    mine = allowed(k, call)
    if mine is not None and args.name not in mine:
        k.audit.append(call.caller.describe(), f"tool.call {args.name}", "denied", reason="not in the group's tools")
        raise EPERM(f"group {call.caller.group!r} may not call tool {args.name!r} ([groups.{call.caller.group}] "
                    f"tools: {', '.join(sorted(mine)) or 'none'})")
    k.tools.call(call, args.name, dict(args.args))
    k.audit.append(call.caller.describe(), f"tool.call {args.name}", "queued")
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
