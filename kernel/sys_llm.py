"""Handlers of the ``llm.*`` syscalls (docs/abi.md 4): they hand the request to the kernel's LLM path
(``Kernel.llm_submit``: checks, the preparer, the engine) and answer later through the call.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from kernel import toolcalls
from kernel.router import DEFERRED, Call
from kernel.sys_tools import allowed
from syscalls import schemas as S
from syscalls.errors import EINVAL

if TYPE_CHECKING:
    from kernel.kernel import Kernel


def llm_generate(k: "Kernel", call: Call, args: S.Generate):
    k.llm_submit(call, args.prompt, args)
    return DEFERRED


def llm_chat(k: "Kernel", call: Call, args: S.Chat):
    messages = [{"role": m.role, "content": m.content} for m in args.messages]
    if args.tools is not None:
        if args.json_schema is not None or args.stream:
            raise EINVAL("tools cannot be combined with json_schema or stream (the tool call is the schema, and "
                         "it comes whole)")
        schema, system, specs = toolcalls.plan(k.tools.tools, allowed(k, call), list(args.tools), args.tool_choice)
        if schema is not None:
            messages = [{"role": "system", "content": system}] + messages
            args = msgspec.structs.replace(args, json_schema=schema)
            k.llm_submit(call, None, args, messages=messages)
            k.tool_chats[call] = specs  # its answer is shaped into tool_calls (toolcalls.shape)
            return DEFERRED
    k.llm_submit(call, None, args, messages=messages)
    return DEFERRED


def llm_cancel(k: "Kernel", call: Call, args: S.Cancel):
    # Keyed by the caller's connection: a caller can only ever name its own requests.
    return {"cancelled": k.llm_cancel(call, args.id)}


def llm_models(k: "Kernel", call: Call, args: S.NoArgs):
    # Names and context sizes only: never the model files' paths (agents never see the model file).
    return {"models": [{"name": name, "default": name == k.engine.default, "n_ctx_seq": k.engine.get(name).n_ctx_seq,
                        "kind": k.engine.get(name).kind} for name in k.engine.names]}
