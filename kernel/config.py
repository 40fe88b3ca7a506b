"""Kernel configuration: defaults, the optional TOML file (``aiosd --config FILE``), privilege groups.

Every section is a typed schema (a ``msgspec.Struct`` that forbids unknown keys) and every number carries its
range (``Meta(ge=..., le=...)``), so a file is checked whole before anything starts: a typo or a value out
of range stops the kernel (or ``aiosd --check-config``, or a reload) with a message naming the file, the
section and key, the value given and what is allowed -- never a silent fallback to a default.  Checks that
span keys (the uid pool's end, eviction shares, tool names, MCP programs) follow the schemas, with messages
of the same shape.  Every key is documented in docs/config.md.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tomllib
from dataclasses import dataclass, field
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from kernel.llm.scheduler import SCHEDULERS
from kernel.storage import BACKENDS as STORAGE_BACKENDS
from syscalls.codec import DEFAULT_MAX_FRAME
from syscalls.schemas import Limits
from syscalls.table import ADMIN, BASIC, LLM, MEMORY, PRIVILEGES, PROC, STORAGE, TOOLS, TOOLWORK


@dataclass(frozen=True)
class Group:
    """A privilege group: what its agents may call, their scheduling priority, their default limits."""
    privileges: frozenset[str]
    priority: int = 0
    limits: dict = field(default_factory=dict)
    allow_fork: bool = False  # may its agents create processes (seccomp)? Threads are always allowed.
    tools: frozenset[str] | None = None  # the tools its agents may call (tool.call, tool.list); None: every tool
    venv: str | None = None  # a virtual environment whose site-packages its agents import from (read-only)


DEFAULT_GROUPS: dict[str, Group] = {
    "admin": Group(frozenset({BASIC, PROC, LLM, STORAGE, MEMORY, TOOLS, ADMIN}), priority=10, allow_fork=True),
    "trusted": Group(frozenset({BASIC, PROC, LLM, STORAGE, MEMORY, TOOLS}), priority=5, allow_fork=True,
                     limits={"memory_mb": 2048, "procs": 256, "open_files": 1024, "storage_mb": 4096,
                             "storage_keys": 1_000_000}),
    "default": Group(frozenset({BASIC, PROC, LLM, STORAGE, MEMORY, TOOLS}), priority=0,
                     limits={"memory_mb": 512, "cpu_seconds": 600, "procs": 64, "open_files": 256,
                             "disk_mb": 256, "disk_inodes": 20000, "syscall_rate": 2000, "storage_mb": 256,
                             "storage_keys": 100_000}),
    "untrusted": Group(frozenset({BASIC, LLM, STORAGE, MEMORY, TOOLS}), priority=-5,
                       limits={"memory_mb": 256, "cpu_seconds": 120, "wall_seconds": 600, "procs": 16,
                               "open_files": 64, "disk_mb": 32, "disk_inodes": 5000, "llm_tokens": 100_000,
                               "syscall_rate": 500, "storage_mb": 16, "storage_keys": 1000}),
    # The kernel's tool workers (kernel/tools.py): each tool sets memory and CPU at spawn.  No syscall rate: a
    # worker makes two syscalls per call, and the callers' own rates bound those.  "storage" only ever with the
    # rights of the agent whose call a worker runs (kernel/sys_storage.py principal).
    "tool": Group(frozenset({BASIC, TOOLWORK, STORAGE}), priority=0,
                  limits={"procs": 16, "open_files": 64, "disk_mb": 64, "disk_inodes": 5000}),
}


class ConfigError(Exception):
    """The config file is unreadable or wrong; the message names the file, section and key, the value given
    and what is allowed."""


UID_FLOOR = 65536  # [sandbox] uid_base: above root, system users, login users and nobody (65534)
SHARE_SCOPES = ("agent", "fleet", "group", "all")  # [llm] share_prefix, narrowest first
KV_LAYOUTS = ("auto", "unified", "streams")
CONFIRMS = ("delete", "overwrite", "cross_write")  # [access] confirm
MCP_CONFIRMS = ("destructive", "always", "never")  # [mcp.NAME] confirm
MODEL_KINDS = ("local", "openai")  # [models.NAME] kind: a GGUF the kernel loads, or a remote core (docs/remote.md)
RESPONSE_FORMATS = ("json_schema", "json_object", "none")  # [models.NAME] response_format
MCP_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
DAY = 86400


def _range(lo, hi, why: str = "") -> Meta:
    """A key's allowed values, ``lo`` to ``hi`` inclusive; ``why`` is shown when a value is refused."""
    return Meta(ge=lo, le=hi, description=why or None)


class Section(msgspec.Struct, forbid_unknown_fields=True):
    """Base of every config table: unknown keys are refused."""


class KernelSection(Section):
    """``[kernel]``: the router's and the process table's limits, the drain, metrics."""
    max_frame: Annotated[int, _range(1024, 1 << 28, "bytes; a syscall frame larger gets E2BIG")] = DEFAULT_MAX_FRAME
    max_procs: Annotated[int, _range(1, 100_000, "live agent processes at once")] = 64
    max_pending: Annotated[int, _range(1, 4096, "LLM requests one agent may have unanswered")] = 32
    max_followers: Annotated[int, _range(1, 1024, "proc.logs follow streams one agent may hold")] = 8
    drain_s: Annotated[float, _range(0, DAY, "seconds work under way gets to finish at SIGTERM; 0: none")] = 30.0
    metrics_port: Annotated[int, _range(0, 65535, "0: off, else a TCP port on 127.0.0.1")] = 0
    restart_delay_s: Annotated[float, _range(0, 3600, "seconds before a restart chain's first relaunch")] = 1.0
    restart_delay_max_s: Annotated[float, _range(0, DAY, "seconds: the doubling relaunch delay's cap")] = 60.0
    restart_burst: Annotated[int, _range(1, 1000, "relaunches within restart_interval_s before it is a crash "
                                                  "loop")] = 5
    restart_interval_s: Annotated[float, _range(1, DAY, "seconds: the crash-loop window")] = 300.0
    trace_kb: Annotated[int, _range(4, 1 << 20, "KiB one agent's syscall trace keeps")] = 256
    trace_total_mb: Annotated[int, _range(1, 1 << 16, "MiB all syscall traces together keep")] = 64
    trace_all: bool = False  # trace every agent, as if spawned with trace: true


class LLMSection(Section):
    """``[llm]``: the default model's engine and the scheduler (docs/engine.md)."""
    model: str = ""          # empty: the embedded default model in the state dir
    n_ctx_seq: Annotated[int, _range(64, 1 << 20, "tokens per sequence")] = 2048
    n_seq_max: Annotated[int, _range(1, 4096, "sequence slots")] = 32
    n_batch: Annotated[int, _range(1, 1 << 16, "tokens per decode step")] = 512
    prefill_chunk: Annotated[int, _range(1, 1 << 16, "prompt tokens a step carries while others decode")] = 64
    threads: Annotated[int, _range(0, 1024, "0: every CPU")] = 0
    max_active: Annotated[int, _range(1, 4096, "sequences decoded together")] = 16
    kv_size: Annotated[int, _range(0, 1 << 26, "KV cells; 0: n_ctx_seq * max_active")] = 0
    kv_layout: Literal[KV_LAYOUTS] = "auto"
    scheduler: Literal[SCHEDULERS] = "fair"
    rr_slice: Annotated[int, _range(1, 1 << 16, "tokens")] = 32
    swap_ram_mb: Annotated[int, _range(0, 1 << 20, "MB of evicted KV kept in RAM")] = 512
    swap_disk_mb: Annotated[int, _range(0, 1 << 24, "MB of evicted KV spilled to disk; 0: never spill")] = 2048
    snapshots: bool = True   # false: evicted sequences are recomputed from their tokens
    share_prefix: Literal[SHARE_SCOPES] = "agent"  # whose cached KV a request may reuse (docs/engine.md)
    default_model: str = ""  # a [models.NAME] that serves requests naming no model; empty: this one


class SandboxSection(Section):
    """``[sandbox]``: the kernel-side layers (docs/sandbox.md)."""
    uids: bool = True         # a per-agent uid from the pool, when the kernel is root and Python is readable
    uid_base: Annotated[int, _range(UID_FLOOR, 2**31 - 2, "agents never run as root, a system user, a login user "
                                    "or nobody")] = 200000
    uid_count: Annotated[int, _range(1, 1_000_000, "uids in the pool")] = 1000
    cgroups: bool = True      # per-agent cgroups (memory, pids, cpu), where the kernel may create them
    cgroup_dir: str = ""      # a cgroup v2 directory delegated to the kernel; empty: its own cgroup if delegated
    cpu_quota: Annotated[float, _range(0, 4096, "CPUs per agent; 0: no quota")] = 1.0
    scratch_tmpfs: bool = True  # a tmpfs of its own on each agent's scratch dir, when the kernel may mount one
    extra_read: list[str] = []  # more read-only paths for agents (Landlock)


class StorageSection(Section):
    """``[storage]``: the storage manager (docs/storage.md)."""
    backend: Literal[STORAGE_BACKENDS] = "sqlite"  # kernel/storage.py BACKENDS (a shared one: docs/scale.md)
    path: str = ""             # the SQLite file; empty: <state-dir>/storage.db
    max_value_mb: Annotated[int, _range(1, 1 << 16, "MB of one value")] = 64
    keep_versions: Annotated[int, _range(1, 1 << 16, "versions kept per key")] = 16
    keep_mb: Annotated[int, _range(1, 1 << 20, "MB of old versions kept per key")] = 64
    upload_ttl_s: Annotated[int, _range(1, 30 * DAY, "seconds an unfinished upload may idle")] = 3600


class MemorySection(Section):
    """``[memory]``: the memory manager (docs/memory.md)."""
    path: str = ""             # the SQLite file; empty: <state-dir>/memory.db
    ram_mb: Annotated[int, _range(1, 1 << 20, "MB of entries kept in RAM")] = 64
    evict_threshold: Annotated[float, _range(0, 1, "a share of ram_mb")] = 0.8  # past this, LRU-K evicts ...
    evict_target: Annotated[float, _range(0, 1, "a share of ram_mb")] = 0.7     # ... down to this share


class AccessSection(Section):
    """``[access]``: grants, confirmations, the audit log (docs/access.md)."""
    path: str = ""             # the directory of access.db (grants) and audit.log; empty: the state dir
    confirm: list[Literal[CONFIRMS]] = []  # operations that wait for an operator
    confirm_timeout_s: Annotated[int, _range(1, 7 * DAY, "seconds a confirmation may wait")] = 300


class ModelSection(Section):
    """``[models.NAME]``: another model to serve; 0 = as in ``[llm]``.  ``kind = "local"``: a GGUF file the
    kernel loads (``path``); ``kind = "openai"``: a remote core, an OpenAI-compatible server (docs/remote.md)."""
    kind: Literal[MODEL_KINDS] = "local"
    path: str = ""  # local: the model's .gguf file (required)
    n_ctx_seq: Annotated[int, _range(0, 1 << 20, "0: as in [llm], else at least 64")] = 0
    n_seq_max: Annotated[int, _range(0, 4096, "0: as in [llm]")] = 0
    max_active: Annotated[int, _range(0, 4096, "0: as in [llm]")] = 0
    kv_size: Annotated[int, _range(0, 1 << 26, "0: as in [llm]")] = 0
    base_url: str = ""         # openai: the server's API root, http(s)://HOST:PORT/v1 (required)
    model: str = ""            # openai: the server's name of the model; empty: NAME
    api_key_file: str = ""     # openai: a file holding the key (read by the kernel at start) ...
    api_key_env: str = ""      # ... or the kernel's environment variable holding it; neither: no key
    concurrency: Annotated[int, _range(1, 1024, "requests in flight to the server, all agents")] = 4
    agent_concurrency: Annotated[int, _range(0, 1024, "one agent's share; 0: half, rounded up")] = 0
    tokens_per_s: Annotated[int, _range(0, 1 << 30, "tokens a second, all agents; 0: no limit")] = 0
    timeout_s: Annotated[float, Meta(gt=0, le=3600, description="seconds the server may send nothing")] = 120.0
    connect_timeout_s: Annotated[float, Meta(gt=0, le=3600, description="seconds to connect")] = 5.0
    retries: Annotated[int, _range(0, 10, "tries again of a request that failed before reaching the agent")] = 2
    breaker_failures: Annotated[int, _range(1, 1000, "failed attempts in a row that open the breaker")] = 5
    breaker_s: Annotated[float, Meta(gt=0, le=DAY, description="seconds the breaker stays open")] = 30.0
    response_format: Literal[RESPONSE_FORMATS] = "json_schema"  # openai: how json_schema and tool calls are sent
    completions: bool = True   # openai: the server offers /v1/completions (llm.generate); false: ENOTSUP
    send_top_k: bool = True    # openai: send top_k (llama-server, vLLM, llama-cpp-python); false: not sent


class McpServer(Section):
    """``[mcp.NAME]``: an MCP server (stdio) whose tools agents may call as ``NAME.TOOL`` (docs/tools.md)."""
    name: str = ""             # the section's NAME (set by the loader, never written in the file)
    command: Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(
        min_length=1, description='argv, the program first, e.g. command = ["python", "/srv/mcp/notes.py"]')] = []
    env: dict[str, str] = {}   # more environment for the server
    read: list[Annotated[str, Meta(min_length=1)]] = []  # more absolute paths it may read and run
    packages: list[Annotated[str, Meta(min_length=1)]] = []  # installed distributions it imports
    network: bool = False      # may it reach the network (only if some tool does not say openWorldHint = false)
    instances: Annotated[int, _range(1, 64, "server processes at most")] = 1
    timeout_s: Annotated[float, Meta(gt=0, le=DAY, description="seconds one call may take")] = 30.0
    start_timeout_s: Annotated[float, Meta(gt=0, le=3600, description="seconds to start")] = 30.0
    memory_mb: Annotated[int, _range(16, 1 << 20, "MB for each server process")] = 512
    cpu_seconds: Annotated[int, _range(1, 365 * DAY, "CPU seconds of each server process")] = 3600
    queue: Annotated[int, _range(1, 1 << 16, "calls waiting beyond the running ones")] = 64
    confirm: Literal[MCP_CONFIRMS] = "destructive"  # which calls wait for an operator


class GroupTable(Section):
    """``[groups.NAME]`` as written in the file; becomes a :class:`Group`."""
    privileges: list[Literal[PRIVILEGES]]
    priority: Annotated[int, _range(-100, 100, "higher runs first under the fair policy")] = 0
    limits: Limits = Limits()  # the ranges of proc.spawn's limits (docs/abi.md 4)
    allow_fork: bool = False
    tools: list[Annotated[str, Meta(min_length=1)]] | None = None
    venv: Annotated[str, Meta(min_length=1, max_length=4096, pattern=r"^/")] | None = None  # an absolute path

    def group(self) -> Group:
        limits = {k: v for k, v in msgspec.structs.asdict(self.limits).items() if v is not None}
        return Group(frozenset(self.privileges), self.priority, limits, self.allow_fork,
                     None if self.tools is None else frozenset(self.tools), self.venv)


class Config(msgspec.Struct):
    """The whole configuration: the defaults, with a file's sections over them."""
    kernel: KernelSection = msgspec.field(default_factory=KernelSection)
    llm: LLMSection = msgspec.field(default_factory=LLMSection)
    groups: dict[str, Group] = msgspec.field(default_factory=lambda: dict(DEFAULT_GROUPS))
    models: dict[str, ModelSection] = {}
    sandbox: SandboxSection = msgspec.field(default_factory=SandboxSection)
    storage: StorageSection = msgspec.field(default_factory=StorageSection)
    memory: MemorySection = msgspec.field(default_factory=MemorySection)
    access: AccessSection = msgspec.field(default_factory=AccessSection)
    mcp: dict[str, McpServer] = {}


SECTIONS = {"kernel": KernelSection, "llm": LLMSection, "sandbox": SandboxSection, "storage": StorageSection,
            "memory": MemorySection, "access": AccessSection}
TABLES = {"groups": GroupTable, "models": ModelSection, "mcp": McpServer}  # [NAME.X]: one table per X


def _toml(value) -> str:
    """``value`` as it would be written in TOML (true, "text", [1, 2])."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return repr(value)


def _bounds(info) -> str:
    """A number's bounds in words: "from 1 to 64", "above 0 and at most 60", "at least 16"."""
    low = f"from {info.ge}" if info.ge is not None else f"above {info.gt}" if info.gt is not None else ""
    high = f"at most {info.le}" if info.le is not None else f"below {info.lt}" if info.lt is not None else ""
    if low.startswith("from") and high.startswith("at most"):
        return f"{low} to {info.le}"
    return " and ".join(w for w in (low.replace("from", "at least"), high) if w)


def _plural(words: str) -> str:
    """``"a string"`` -> ``"strings"``; ``"one of a, b"`` -> ``"items, each one of a, b"``."""
    rest = words.split(" ", 1)[1] if words.startswith(("a ", "an ")) else ""
    if re.fullmatch(r"[a-z -]+", rest):
        return rest + "s"
    return f"items, each {words}"


# Literal values in the order they are documented in (msgspec.inspect sorts them)
_ORDER = {frozenset(t): t for t in (KV_LAYOUTS, SCHEDULERS, SHARE_SCOPES, CONFIRMS, MCP_CONFIRMS, PRIVILEGES)}


def allowed(info) -> str:
    """What a value of the type ``info`` (``msgspec.inspect``) may be, in words."""
    from msgspec import inspect as mi
    if isinstance(info, mi.Metadata):
        return allowed(info.type)
    if isinstance(info, mi.BoolType):
        return "true or false"
    if isinstance(info, (mi.IntType, mi.FloatType)):
        kind = "an integer" if isinstance(info, mi.IntType) else "a number"
        return f"{kind} {_bounds(info)}".rstrip()
    if isinstance(info, mi.LiteralType):
        return "one of " + ", ".join(str(v) for v in _ORDER.get(frozenset(info.values), info.values))
    if isinstance(info, mi.StrType):
        return "a non-empty string" if info.min_length else "a string"
    if isinstance(info, (mi.ListType, mi.SetType, mi.FrozenSetType)):
        return f"a list of {_plural(allowed(info.item_type))}"
    if isinstance(info, mi.DictType):
        return f"a table of {_plural(allowed(info.value_type))}"
    if isinstance(info, mi.UnionType):
        return " or ".join(allowed(t) for t in info.types if not isinstance(t, mi.NoneType))
    if isinstance(info, mi.StructType):
        return "a table with keys " + ", ".join(f.name for f in info.fields)
    return "a value of another type"


def _why(info) -> str:
    from msgspec import inspect as mi
    while isinstance(info, mi.UnionType):  # X | None
        info = next(t for t in info.types if not isinstance(t, mi.NoneType))
    if isinstance(info, mi.Metadata) and (info.extra_json_schema or {}).get("description"):
        return f" ({info.extra_json_schema['description']})"
    return ""


def _field_info(schema: type, keys: list[str]):
    """The ``msgspec.inspect`` type of the key at ``keys`` (a path of names) under ``schema``; None if none."""
    from msgspec import inspect as mi
    info = mi.type_info(schema)
    for key in keys:
        while isinstance(info, (mi.Metadata, mi.UnionType)):
            info = info.type if isinstance(info, mi.Metadata) else \
                next(t for t in info.types if not isinstance(t, mi.NoneType))
        if isinstance(info, mi.StructType):
            info = next((f.type for f in info.fields if f.name == key), None)
        elif isinstance(info, (mi.ListType, mi.DictType)):
            info = info.item_type if isinstance(info, mi.ListType) else info.value_type
        else:
            return None
        if info is None:
            return None
    return info


_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


def _refusal(exc: msgspec.ValidationError, values: dict, schema: type, where: str) -> ConfigError:
    """``exc`` (msgspec's) as a message naming the file and section (``where``), the key, the value given and
    what is allowed."""
    m = _AT.match(str(exc))
    what, path = m["what"], m["path"] or ""
    keys = [name or index for name, index in re.findall(r"\.([^.\[]+)|\[([^\]]+)\]", path)]
    if "..." in keys:  # a value in a table: msgspec does not say which key; name the table
        keys = keys[:keys.index("...")]
    unknown = re.match(r"Object contains unknown field `(.+)`", what)
    missing = re.match(r"Object missing required field `(.+)`", what)
    info = _field_info(schema, keys)
    key = "".join(f"[{k}]" if k.isdigit() else f".{k}" for k in keys).lstrip(".")
    if unknown:
        known = ", ".join(f.name for f in getattr(info, "fields", ()) if f.name != "name" or schema is not McpServer)
        key = f"{key}.{unknown[1]}" if key else unknown[1]
        return ConfigError(f"{where}: unknown key {key!r}; known keys: {known}")
    if missing:
        key = f"{key}.{missing[1]}" if key else missing[1]
        need = _field_info(schema, [*keys, missing[1]])
        return ConfigError(f"{where}: {key} is required: {allowed(need)}{_why(need)}")
    value = values
    for k in keys:
        try:
            value = value[int(k)] if isinstance(value, list) else value[k]
        except (KeyError, IndexError, ValueError, TypeError):
            break
    return ConfigError(f"{where} {key} = {_toml(value)}: expected {allowed(info)}{_why(info)}")


def _convert(values, schema: type, where: str):
    """``values`` (a TOML table) as ``schema``, or a ConfigError naming ``where`` (file and section)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a table ({allowed(msgspec.inspect.type_info(schema))}), got "
                          f"{_toml(values)}")
    try:
        return msgspec.convert(values, schema)
    except msgspec.ValidationError as exc:
        raise _refusal(exc, values, schema, where) from None


def _mcp(name: str, spec, where: str) -> McpServer:
    """One ``[mcp.NAME]`` section, checked: a name, a command that resolves to a program, paths that exist."""
    if not MCP_NAME.fullmatch(name):
        raise ConfigError(f"{where}: a table named with 1-32 lower-case letters, digits, '_' or '-' (a letter "
                          f"first): its tools are called NAME.TOOL; got {name!r}")
    if isinstance(spec, dict) and "name" in spec:
        raise ConfigError(f"{where}: unknown key 'name' (the section's name is the server's)")
    server = _convert(spec, McpServer, where)
    server.name = name
    if not server.command:
        raise ConfigError(f"{where}: command is required: argv, the program first, e.g. "
                          "command = [\"python\", \"/srv/mcp/notes.py\"]")
    if any("\0" in a for a in server.command):
        raise ConfigError(f"{where} command = {_toml(server.command)}: expected strings without NUL")
    if server.command[0] != "python" and shutil.which(server.command[0]) is None:
        raise ConfigError(f"{where} command = {_toml(server.command)}: program {server.command[0]!r} not found "
                          "(give its absolute path)")
    missing = [p for p in server.read if not os.path.isabs(p) or not os.path.exists(p)]
    if missing:
        raise ConfigError(f"{where} read = {_toml(server.read)}: {_toml(missing)} must be absolute paths that exist")
    return server


def _check_model(m: ModelSection, where: str) -> None:
    """A ``[models.NAME]`` section's keys fit its kind."""
    if m.kind == "local":
        if not m.path:
            raise ConfigError(f"{where} needs path = \"FILE.gguf\" (or kind = \"openai\" and base_url)")
        return
    if m.path or not m.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: a remote core (kind = \"openai\") takes base_url = \"http(s)://HOST:PORT/v1\" "
                          f"and no path; got base_url = {_toml(m.base_url)}, path = {_toml(m.path)}")
    if m.api_key_file and m.api_key_env:
        raise ConfigError(f"{where}: api_key_file = {_toml(m.api_key_file)}, api_key_env = {_toml(m.api_key_env)}: "
                          "give one of them, not both")
    if m.agent_concurrency > m.concurrency:
        raise ConfigError(f"{where}: agent_concurrency = {m.agent_concurrency}, concurrency = {m.concurrency}: "
                          "expected agent_concurrency <= concurrency (0: half of it)")


def _check(cfg: Config, path) -> None:
    """The checks that span keys, after every table has passed its schema."""
    sb = cfg.sandbox
    if sb.uid_base + sb.uid_count >= 2**31:
        raise ConfigError(f"{path}: [sandbox] uid_base = {sb.uid_base}, uid_count = {sb.uid_count}: the pool must end "
                          f"below 2^31 (uid_base + uid_count < {2**31})")
    kc = cfg.kernel
    if kc.restart_delay_max_s < kc.restart_delay_s:
        raise ConfigError(f"{path}: [kernel] restart_delay_s = {kc.restart_delay_s}, restart_delay_max_s = "
                          f"{kc.restart_delay_max_s}: expected restart_delay_s <= restart_delay_max_s (the delay doubles "
                          "from the first up to the cap)")
    if kc.trace_kb > kc.trace_total_mb << 10:
        raise ConfigError(f"{path}: [kernel] trace_kb = {kc.trace_kb}, trace_total_mb = {kc.trace_total_mb}: "
                          "expected trace_kb <= trace_total_mb * 1024 (one trace must fit in the total)")
    mem = cfg.memory
    if mem.evict_target > mem.evict_threshold:
        raise ConfigError(f"{path}: [memory] evict_target = {mem.evict_target}, evict_threshold = "
                          f"{mem.evict_threshold}: expected evict_target <= evict_threshold (evict down to below "
                          "where eviction starts)")
    for name, model in cfg.models.items():
        if 0 < model.n_ctx_seq < 64:
            raise ConfigError(f"{path}: [models.{name}] n_ctx_seq = {model.n_ctx_seq}: expected 0 (as in [llm]) "
                              "or from 64 to 1048576")
        _check_model(model, f"{path}: [models.{name}]")
    if cfg.llm.default_model and cfg.llm.default_model not in cfg.models:
        raise ConfigError(f"{path}: [llm] default_model = {_toml(cfg.llm.default_model)}: expected the NAME of a "
                          f"[models.NAME] section (there are: {', '.join(cfg.models) or 'none'}) or \"\"")
    from kernel.tools import BUILTIN_TOOLS
    for gname, group in cfg.groups.items():  # an MCP server's tools are known once it runs: SERVER.* or SERVER.X
        unknown = sorted(t for t in group.tools or () if t not in BUILTIN_TOOLS and t.split(".", 1)[0] not in cfg.mcp)
        if unknown:
            raise ConfigError(f"{path}: [groups.{gname}] tools = {_toml(sorted(group.tools))} names unknown tools "
                              f"{_toml(unknown)}; known: {', '.join(sorted(BUILTIN_TOOLS))}, and SERVER.* or "
                              "SERVER.TOOL of an [mcp.SERVER]")


def load(path: str | os.PathLike | None) -> Config:
    """The configuration from ``path`` (TOML) over the defaults; the defaults alone when ``path`` is None.
    Raises ConfigError naming the file, key, value and what is allowed for the first thing wrong."""
    cfg = Config()
    if path is None:
        return cfg
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    for name, values in data.items():
        where = f"{path}: [{name}]"
        if name in SECTIONS:
            if name == "llm" and isinstance(values, dict) and isinstance(values.get("share_prefix"), bool):
                values = dict(values, share_prefix="all" if values["share_prefix"] else "agent")  # the old switch
            setattr(cfg, name, _convert(values, SECTIONS[name], where))
        elif name in TABLES and isinstance(values, dict):
            for key, spec in values.items():
                where = f"{path}: [{name}.{key}]"
                if name == "groups":
                    cfg.groups[key] = _convert(spec, GroupTable, where).group()
                elif name == "models":
                    if key == "default":
                        raise ConfigError(f"{where}: the name 'default' is the [llm] model; choose another")
                    cfg.models[key] = _convert(spec, ModelSection, where)
                else:
                    cfg.mcp[key] = _mcp(key, spec, where)
        else:
            raise ConfigError(f"{path}: unknown section [{name}]; known: {', '.join(f'[{s}]' for s in SECTIONS)}, "
                              f"{', '.join(f'[{t}.NAME]' for t in TABLES)}")
    _check(cfg, path)
    return cfg


def ranges() -> list[str]:
    """Every table's keys with what each allows, one Markdown line a table (docs/config.md, "Ranges")."""
    lines = []
    for name, schema in [*SECTIONS.items(), *((f"{t}.NAME", s) for t, s in TABLES.items())]:
        keys = [f"`{f.name}` {allowed(f.type)}" for f in msgspec.inspect.type_info(schema).fields
                if not (schema is McpServer and f.name == "name")]
        lines.append(f"- `[{name}]`: " + "; ".join(keys) + ".")
    return lines
