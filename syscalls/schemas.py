"""Argument schemas, one ``msgspec.Struct`` per syscall (docs/abi.md section 4).

Unknown fields are rejected, types are strict and ranges are checked by the decoder, so a handler only ever
sees well-formed arguments.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta


class Args(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Base of every argument schema."""


class NoArgs(Args):
    pass


ProcIdT = Annotated[int, Meta(ge=1)]


class ProcId(Args):
    id: ProcIdT


# proc.kill's signals (docs/abi.md 4): SIGKILL kills the whole tree; the others go to the process group.
KILL_SIGNALS = ("SIGKILL", "SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGSTOP", "SIGCONT")
STOP_SIGNALS = ("SIGKILL", "SIGTERM", "SIGINT", "SIGQUIT")  # a stop: no relaunch by the restart policy


class Kill(Args):
    id: ProcIdT
    signal: Literal[KILL_SIGNALS] = "SIGKILL"  # type: ignore[valid-type]


class Limits(Args, omit_defaults=True):
    """Per-process resource limits (docs/abi.md 4, proc.spawn); None = the group's default (or unlimited)."""

    memory_mb: Annotated[int, Meta(ge=16)] | None = None        # RSS of the process tree (+ RLIMIT_AS)
    cpu_seconds: Annotated[int, Meta(ge=1)] | None = None       # CPU time of the process tree
    wall_seconds: Annotated[int, Meta(ge=1)] | None = None      # lifetime
    procs: Annotated[int, Meta(ge=1, le=4096)] | None = None    # processes + threads
    open_files: Annotated[int, Meta(ge=16, le=65536)] | None = None
    disk_mb: Annotated[int, Meta(ge=1)] | None = None           # MB allocated in scratch + captured output
    disk_inodes: Annotated[int, Meta(ge=1)] | None = None       # files + directories in scratch
    llm_tokens: Annotated[int, Meta(ge=1)] | None = None        # prompt + completion tokens (EDQUOT beyond)
    syscall_rate: Annotated[int, Meta(ge=1)] | None = None      # syscalls per second (EAGAIN beyond)
    storage_mb: Annotated[int, Meta(ge=1)] | None = None        # bytes its namespace keeps (EDQUOT beyond)
    storage_keys: Annotated[int, Meta(ge=1)] | None = None      # keys in its namespace (EDQUOT beyond)


class Spawn(Args):
    source: Annotated[str, Meta(max_length=1 << 20)]
    filename: Annotated[str, Meta(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_.-]+$")] = "agent.py"
    name: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    group: Annotated[str, Meta(min_length=1, max_length=64)] = "default"
    argv: Annotated[list[Annotated[str, Meta(max_length=4096)]], Meta(max_length=256)] = []
    limits: Limits | None = None
    fleet: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")] | None = None
    restart: Literal["no", "on-failure", "always"] = "no"  # the restart policy (docs/abi.md, "Restart chains")
    trace: bool = False  # record its syscalls (docs/abi.md, "Syscall traces")
    venv: Annotated[str, Meta(min_length=1, max_length=4096, pattern=r"^/")] | None = None  # operators only


class Ready(Args):
    layers: Annotated[dict[Annotated[str, Meta(max_length=32)], Annotated[str, Meta(max_length=512)]],
                      Meta(max_length=32)]


class Trace(Args):
    id: ProcIdT
    after: Annotated[int, Meta(ge=0, le=(1 << 63) - 1)] = 0
    discard: bool = False


class Logs(Args):
    id: ProcIdT
    follow: bool = False
    stream: bool = False


StopT = Annotated[list[Annotated[str, Meta(min_length=1, max_length=256)]], Meta(max_length=8)]


class _Sampling(Args, kw_only=True):
    model: Annotated[str, Meta(min_length=1, max_length=64)] | None = None  # None: the default model
    json_schema: dict[str, Any] | None = None  # constrain the output to JSON matching this schema
    max_tokens: Annotated[int, Meta(ge=1, le=4096)] = 128
    temperature: Annotated[float, Meta(ge=0.0, le=100.0)] = 0.0
    top_k: Annotated[int, Meta(ge=0, le=1 << 20)] = 40  # past the vocabulary it changes nothing
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.95
    seed: Annotated[int, Meta(ge=0, lt=1 << 32)] | None = None
    stop: StopT = []
    stream: bool = False


class Generate(_Sampling, kw_only=True):
    prompt: str


class Message(Args):
    role: Literal["system", "user", "assistant"]
    content: str


class Chat(_Sampling, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1, max_length=256)]
    # Tool calls (docs/abi.md, llm.chat; kernel/toolcalls.py): tool names or {name, description, parameters}.
    tools: Annotated[list[Any], Meta(max_length=32)] | None = None
    tool_choice: Any = None  # "auto" | "required" | "none" | {"name": TOOL}; default "required" with tools


class Cancel(Args):
    id: Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]  # the request id of the caller's own llm.generate / llm.chat


# Storage (docs/abi.md, "Storage").  Keys are checked by the storage manager (kernel/storage.py), which names
# the rule a key breaks; the schema only bounds the sizes the kernel reads.
KeyT = Annotated[str, Meta(max_length=4096)]
NamespaceT = Annotated[str, Meta(min_length=1, max_length=64)] | None
VersionT = Annotated[int, Meta(ge=1, le=(1 << 63) - 1)]


class StorageKey(Args, kw_only=True):
    key: KeyT
    namespace: NamespaceT = None


class StoragePut(StorageKey, kw_only=True):
    data: Any  # bin or str (msgspec cannot decode that union): checked by kernel/sys_storage.py
    content_type: Annotated[str, Meta(min_length=1, max_length=255)] | None = None
    if_version: Annotated[int, Meta(ge=0, le=(1 << 63) - 1)] | None = None
    offset: Annotated[int, Meta(ge=0, le=(1 << 63) - 1)] = 0
    final: bool = True


class StorageGet(StorageKey, kw_only=True):
    version: VersionT | None = None
    offset: Annotated[int, Meta(ge=0, le=(1 << 63) - 1)] = 0
    length: Annotated[int, Meta(ge=0, le=(1 << 63) - 1)] | None = None


class StorageList(Args, kw_only=True):
    prefix: KeyT = ""
    after: KeyT = ""
    limit: Annotated[int, Meta(ge=1, le=1000)] = 100
    namespace: NamespaceT = None


class StorageDelete(StorageKey, kw_only=True):
    if_version: Annotated[int, Meta(ge=0, le=(1 << 63) - 1)] | None = None
    purge: bool = False


class StorageRollback(StorageKey, kw_only=True):
    version: VersionT
    if_version: Annotated[int, Meta(ge=0, le=(1 << 63) - 1)] | None = None


# Memory (docs/abi.md, "Memory").  Texts, metadata and queries are bounded by the memory manager
# (kernel/memory.py), which names the rule; the schema bounds what the kernel decodes.
MetadataT = dict[Annotated[str, Meta(max_length=64)], Any] | None


class MemoryAdd(Args, kw_only=True):
    text: Annotated[str, Meta(max_length=1 << 20)]
    metadata: MetadataT = None
    namespace: NamespaceT = None


class MemoryId(Args, kw_only=True):
    id: Annotated[int, Meta(ge=1, le=(1 << 63) - 1)]
    namespace: NamespaceT = None


class MemoryList(Args, kw_only=True):
    after: Annotated[int, Meta(ge=0, le=(1 << 63) - 1)] = 0
    limit: Annotated[int, Meta(ge=1, le=1000)] = 100
    filter: MetadataT = None
    namespace: NamespaceT = None


class MemorySearch(Args, kw_only=True):
    query: Annotated[str, Meta(max_length=1 << 16)]
    k: Annotated[int, Meta(ge=1, le=100)] = 5
    filter: MetadataT = None
    mode: Literal["hybrid", "embedding", "keyword"] = "hybrid"
    namespace: NamespaceT = None


class MemoryStats(Args, kw_only=True):
    namespace: NamespaceT = None


# Access (docs/abi.md, "Access").
class AccessGrant(Args, kw_only=True):
    to: Annotated[str, Meta(min_length=1, max_length=70)]  # an agent name, or "group:NAME"
    mode: Literal["read", "read-write"] = "read"
    prefix: KeyT = ""
    namespace: NamespaceT = None


class AccessRevoke(Args, kw_only=True):
    id: Annotated[int, Meta(ge=1, le=(1 << 63) - 1)]


class AccessList(Args, kw_only=True):
    namespace: NamespaceT = None


class AccessDecide(Args, kw_only=True):
    id: Annotated[int, Meta(ge=1, le=(1 << 63) - 1)]
    approve: bool


# Tools (docs/abi.md, "Tools").  Arguments are validated against each tool's own JSON Schema by the kernel
# (kernel/tools.py), which names the offending field.
class ToolCall(Args, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=100)]
    args: dict[str, Any] = {}


class ToolRegister(Args, kw_only=True):
    tools: Annotated[list[dict[str, Any]], Meta(max_length=4096)]
    final: bool = True


class ToolDone(Args, kw_only=True):
    job: Annotated[int, Meta(ge=1, le=(1 << 63) - 1)]
    result: Any = None
    error: Annotated[str, Meta(max_length=65536)] | None = None
