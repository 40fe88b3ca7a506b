"""The syscall table: name -> (argument schema, privilege, handler).  docs/abi.md section 4 is its spec.

As in xv6's ``syscall.c`` the table is the one place that shows every syscall's path.  The handlers live in the
kernel, one module per subsystem (``kernel/sys_proc.py``, ``kernel/sys_llm.py``...: xv6's ``sysproc.c``,
``sysfile.c``); the table names each by ``"module:function"``, so that this package -- the ABI, which agents
import too -- never imports the kernel.  The router resolves the names once at start (``kernel.router.
handlers``), decodes, checks privilege and dispatches; nothing else does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from syscalls import schemas as S

# Privileges (docs/abi.md section 5).
BASIC, PROC, LLM, STORAGE, MEMORY, TOOLS, ADMIN = "basic", "proc", "llm", "storage", "memory", "tools", "admin"
TOOLWORK = "toolwork"  # the kernel's tool workers only (group "tool")
PRIVILEGES = (BASIC, PROC, LLM, STORAGE, MEMORY, TOOLS, TOOLWORK, ADMIN)


@dataclass(frozen=True)
class Syscall:
    name: str
    handler: str  # "kernel.sys_proc:proc_kill": the kernel's handler, (kernel, call, args) -> result | DEFERRED
    schema: type[S.Args]
    privilege: str
    decoder: msgspec.msgpack.Decoder = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "decoder", msgspec.msgpack.Decoder(self.schema))


TABLE: dict[str, Syscall] = {
    s.name: s
    for s in (
        Syscall("sys.ping", "kernel.sys_proc:sys_ping", S.NoArgs, BASIC),
        Syscall("sys.shutdown", "kernel.sys_proc:sys_shutdown", S.NoArgs, ADMIN),
        Syscall("sys.status", "kernel.sys_proc:sys_status", S.NoArgs, ADMIN),
        Syscall("sys.metrics", "kernel.sys_proc:sys_metrics", S.NoArgs, ADMIN),
        Syscall("proc.self", "kernel.sys_proc:proc_self", S.NoArgs, BASIC),
        Syscall("proc.ready", "kernel.sys_proc:proc_ready", S.Ready, BASIC),
        Syscall("proc.list", "kernel.sys_proc:proc_list", S.NoArgs, PROC),
        Syscall("proc.kill", "kernel.sys_proc:proc_kill", S.Kill, PROC),
        Syscall("proc.spawn", "kernel.sys_proc:proc_spawn", S.Spawn, ADMIN),
        Syscall("proc.logs", "kernel.sys_proc:proc_logs", S.Logs, PROC),
        Syscall("proc.trace", "kernel.sys_proc:proc_trace", S.Trace, ADMIN),
        Syscall("llm.generate", "kernel.sys_llm:llm_generate", S.Generate, LLM),
        Syscall("llm.chat", "kernel.sys_llm:llm_chat", S.Chat, LLM),
        Syscall("llm.cancel", "kernel.sys_llm:llm_cancel", S.Cancel, LLM),
        Syscall("llm.models", "kernel.sys_llm:llm_models", S.NoArgs, LLM),
        Syscall("storage.put", "kernel.sys_storage:storage_put", S.StoragePut, STORAGE),
        Syscall("storage.get", "kernel.sys_storage:storage_get", S.StorageGet, STORAGE),
        Syscall("storage.stat", "kernel.sys_storage:storage_stat", S.StorageKey, STORAGE),
        Syscall("storage.list", "kernel.sys_storage:storage_list", S.StorageList, STORAGE),
        Syscall("storage.delete", "kernel.sys_storage:storage_delete", S.StorageDelete, STORAGE),
        Syscall("storage.versions", "kernel.sys_storage:storage_versions", S.StorageKey, STORAGE),
        Syscall("storage.rollback", "kernel.sys_storage:storage_rollback", S.StorageRollback, STORAGE),
        Syscall("memory.add", "kernel.sys_memory:memory_add", S.MemoryAdd, MEMORY),
        Syscall("memory.get", "kernel.sys_memory:memory_get", S.MemoryId, MEMORY),
        Syscall("memory.list", "kernel.sys_memory:memory_list", S.MemoryList, MEMORY),
        Syscall("memory.delete", "kernel.sys_memory:memory_delete", S.MemoryId, MEMORY),
        Syscall("memory.search", "kernel.sys_memory:memory_search", S.MemorySearch, MEMORY),
        Syscall("memory.stats", "kernel.sys_memory:memory_stats", S.MemoryStats, MEMORY),
        Syscall("tool.list", "kernel.sys_tools:tool_list", S.NoArgs, TOOLS),
        Syscall("tool.call", "kernel.sys_tools:tool_call", S.ToolCall, TOOLS),
        Syscall("tool.next", "kernel.sys_tools:tool_next", S.NoArgs, TOOLWORK),
        Syscall("tool.done", "kernel.sys_tools:tool_done", S.ToolDone, TOOLWORK),
        Syscall("tool.register", "kernel.sys_tools:tool_register", S.ToolRegister, TOOLWORK),
        Syscall("access.grant", "kernel.sys_access:access_grant", S.AccessGrant, STORAGE),
        Syscall("access.revoke", "kernel.sys_access:access_revoke", S.AccessRevoke, STORAGE),
        Syscall("access.list", "kernel.sys_access:access_list", S.AccessList, STORAGE),
        Syscall("access.pending", "kernel.sys_access:access_pending", S.NoArgs, ADMIN),
        Syscall("access.decide", "kernel.sys_access:access_decide", S.AccessDecide, ADMIN),
    )
}
