"""Handlers of the ``llm.*`` syscalls (docs/abi.md 4): they hand the request to the kernel's LLM path
(``Kernel.llm_submit``: checks, the preparer, the engine) and answer later through the call.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from kernel.router import DEFERRED, Call
from syscalls import schemas as S

if TYPE_CHECKING:
    from kernel.kernel import Kernel


def llm_generate(k: "Kernel", call: Call, args: S.Generate):
    k.llm_submit(call, args.prompt, args)
    return DEFERRED


def llm_chat(k: "Kernel", call: Call, args: S.Chat):
    messages = [{"role": m.role, "content": m.content} for m in args.messages]
    k.llm_submit(call, None, args, messages=messages)
    return DEFERRED


def llm_cancel(k: "Kernel", call: Call, args: S.Cancel):
    # Keyed by the caller's connection: a caller can only ever name its own requests.
    return {"cancelled": k.llm_cancel(call, args.id)}
