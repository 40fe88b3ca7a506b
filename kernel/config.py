"""Kernel configuration: defaults, the optional TOML file (``aiosd --config FILE``), privilege groups.

Every key is documented in docs/config.md.  Unknown sections or keys are an error that names them, so a
typo never silently falls back to a default.
"""
from __future__ import annotations

import os
import re
import shutil
import tomllib
from dataclasses import dataclass, field, fields

from kernel.resources import LIMIT_KEYS
from kernel.scheduler import POLICIES
from syscalls.codec import DEFAULT_MAX_FRAME
from syscalls.table import ADMIN, BASIC, LLM, MEMORY, PRIVILEGES, PROC, STORAGE, TOOLS, TOOLWORK

@dataclass(frozen=True)
class Group:
    """A privilege group: what its agents may call, their scheduling priority, their default limits."""
    privileges: frozenset[str]
    priority: int = 0
    limits: dict = field(default_factory=dict)
    allow_fork: bool = False  # may its agents create processes (seccomp)? Threads are always allowed.
    tools: frozenset[str] | None = None  # the tools its agents may call (tool.call, tool.list); None: every tool


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
    """The config file is unreadable or wrong; the message names the file, section and key."""


@dataclass
class KernelSection:
    max_frame: int = DEFAULT_MAX_FRAME
    max_procs: int = 64
    max_pending: int = 32    # LLM requests one agent may have unanswered (EAGAIN beyond)
    max_followers: int = 8   # proc.logs follow streams one agent may hold open (EAGAIN beyond)
    drain_s: float = 30.0    # SIGTERM: generations and tool calls under way get this long to finish (0: none)
    metrics_port: int = 0    # serve Prometheus metrics on 127.0.0.1:PORT (0: only through sys.metrics)


@dataclass
class LLMSection:
    model: str = ""          # empty: the embedded default model in the state dir
    n_ctx_seq: int = 2048
    n_seq_max: int = 32      # sequence slots: running + preempted + cached sessions
    n_batch: int = 512
    prefill_chunk: int = 64   # prompt tokens a step carries while others decode (chunked prefill)
    threads: int = 0         # 0: os.cpu_count()
    max_active: int = 16     # sequences decoded together in one step (capped at n_seq_max)
    kv_size: int = 0         # KV cells shared by all sequences; 0: n_ctx_seq * max_active
    kv_layout: str = "auto"  # unified (one KV pool) | streams (a pool per slot) | auto (docs/engine.md)
    scheduler: str = "fair"  # fifo | rr | fair (kernel/scheduler.py)
    rr_slice: int = 32       # tokens: rr's time slice, fair's hysteresis
    swap_ram_mb: int = 512   # evicted sequences' KV snapshots in RAM, then
    swap_disk_mb: int = 2048  # on disk in <runtime-dir>/swap (0: never spill)
    snapshots: bool = True   # false: evicted sequences are recomputed from their tokens
    share_prefix: str = "agent"  # whose cached KV a request may reuse: agent | fleet | group | all (docs/engine.md)
    default_model: str = ""  # a [models.NAME] that serves requests naming no model; empty: this one


@dataclass
class SandboxSection:
    """``[sandbox]``: the kernel-side layers (docs/sandbox.md)."""
    uids: bool = True         # a per-agent uid from the pool, when the kernel is root and Python is readable
    uid_base: int = 200000
    uid_count: int = 1000
    cgroups: bool = True      # per-agent cgroups (memory, pids, cpu), when the kernel is root
    cpu_quota: float = 1.0    # CPUs per agent (cgroup cpu quota); 0 = none
    scratch_tmpfs: bool = True  # a tmpfs of its own on each agent's scratch dir, when the kernel may mount one
    extra_read: list = field(default_factory=list)  # more read-only paths for agents (Landlock)


@dataclass
class StorageSection:
    """``[storage]``: the storage manager (docs/storage.md)."""
    path: str = ""             # the SQLite file; empty: <state-dir>/storage.db
    max_value_mb: int = 64     # one value, uploaded in parts (E2BIG beyond)
    keep_versions: int = 16    # versions kept per key (the newest always)
    keep_mb: int = 64          # ... while their sizes total at most this
    upload_ttl_s: int = 3600   # an unfinished upload is discarded after this long idle


@dataclass
class MemorySection:
    """``[memory]``: the memory manager (docs/memory.md)."""
    path: str = ""             # the SQLite file; empty: <state-dir>/memory.db
    ram_mb: int = 64           # entries' text and metadata kept in RAM, all agents together
    evict_threshold: float = 0.8  # past this share of ram_mb, LRU-K evicts ...
    evict_target: float = 0.7     # ... down to this share (the rest is paged in from the file on access)


@dataclass
class AccessSection:
    """``[access]``: grants, confirmations, the audit log (docs/access.md)."""
    path: str = ""             # the directory of access.db (grants) and audit.log; empty: the state dir
    confirm: list = field(default_factory=list)  # operations that wait for an operator: delete, overwrite, cross_write
    confirm_timeout_s: int = 300  # a request nobody approves by then is refused (EACCES)


@dataclass
class ModelSection:
    """``[models.NAME]``: another model to serve; 0 = as in ``[llm]``.  ``kind = "local"``: a GGUF file the
    kernel loads (``path``); ``kind = "openai"``: a remote core, an OpenAI-compatible server (docs/remote.md)."""
    kind: str = "local"        # local | openai
    path: str = ""             # local: the GGUF file
    n_ctx_seq: int = 0
    n_seq_max: int = 0
    max_active: int = 0
    kv_size: int = 0
    base_url: str = ""         # openai: the server's API root, e.g. http://10.0.0.5:8000/v1
    model: str = ""            # openai: the server's name of the model; empty: NAME
    api_key_file: str = ""     # openai: a file holding the key (read by the kernel at start) ...
    api_key_env: str = ""      # ... or the kernel's environment variable holding it; neither: no key
    concurrency: int = 4       # openai: requests in flight to the server, all agents together
    agent_concurrency: int = 0  # openai: ... of which one agent may hold at most this many; 0: half, rounded up
    tokens_per_s: int = 0      # openai: prompt + completion tokens a second, all agents together; 0: no limit
    timeout_s: float = 120.0   # openai: the longest the server may send nothing (ETIMEDOUT)
    connect_timeout_s: float = 5.0
    retries: int = 2           # openai: a request that failed before anything was sent is tried again this often
    breaker_failures: int = 5  # openai: this many failures in a row open the circuit breaker ...
    breaker_s: float = 30.0    # ... for this long: requests fail at once (EIO), then one probe is let through
    response_format: str = "json_schema"  # openai: how json_schema is sent: json_schema | json_object | none
    completions: bool = True   # openai: the server offers /v1/completions (llm.generate); false: ENOTSUP
    send_top_k: bool = True    # openai: send top_k (llama-server, vLLM, llama-cpp-python); false: not sent


MODEL_KINDS = ("local", "openai")
RESPONSE_FORMATS = ("json_schema", "json_object", "none")


@dataclass
class McpServer:
    """``[mcp.NAME]``: an MCP server (stdio) whose tools agents may call as ``NAME.TOOL`` (docs/tools.md)."""
    name: str = ""
    command: list = field(default_factory=list)  # argv; "python" is the kernel's own interpreter
    env: dict = field(default_factory=dict)      # more environment for the server (strings)
    read: list = field(default_factory=list)     # more paths it may read and run (its program, its data)
    packages: list = field(default_factory=list)  # installed distributions it imports (with their requirements)
    network: bool = False      # may it reach the network (only if some tool does not say openWorldHint = false)
    instances: int = 1         # server processes at most: calls of its tools run at most this many at once
    timeout_s: float = 30.0    # wall time of one call (ETIMEDOUT; the server process is replaced)
    start_timeout_s: float = 30.0  # start and list its tools within this
    memory_mb: int = 512       # each server process with its bridge
    cpu_seconds: int = 3600
    queue: int = 64            # calls waiting beyond the running ones (EAGAIN past it)
    confirm: str = "destructive"  # which calls wait for an operator: destructive | always | never


UID_FLOOR = 65536  # [sandbox] uid_base: above root, system users, login users and nobody (65534)
SHARE_SCOPES = ("agent", "fleet", "group", "all")  # [llm] share_prefix, narrowest first
MCP_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


@dataclass
class Config:
    kernel: KernelSection = field(default_factory=KernelSection)
    llm: LLMSection = field(default_factory=LLMSection)
    groups: dict[str, Group] = field(default_factory=lambda: dict(DEFAULT_GROUPS))
    models: dict[str, ModelSection] = field(default_factory=dict)
    sandbox: SandboxSection = field(default_factory=SandboxSection)
    storage: StorageSection = field(default_factory=StorageSection)
    memory: MemorySection = field(default_factory=MemorySection)
    access: AccessSection = field(default_factory=AccessSection)
    mcp: dict[str, McpServer] = field(default_factory=dict)


def _fill(section, values: dict, where: str) -> None:
    known = {f.name: f for f in fields(section)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}; known keys: {', '.join(known)}")
        want = type(getattr(section, key))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or isinstance(value, bool) != (want is bool):
            raise ConfigError(f"{where}.{key}: expected {want.__name__}, got {value!r}")
        setattr(section, key, value)


def _group(spec, where: str) -> Group:
    """One ``[groups.NAME]`` table: privileges (required), priority, limits."""
    if not isinstance(spec, dict) or not isinstance(spec.get("privileges"), list):
        raise ConfigError(f"{where} needs `privileges = [...]` (and may have `priority`, `limits`)")
    extra = set(spec) - {"privileges", "priority", "limits", "allow_fork", "tools"}
    if extra:
        raise ConfigError(f"{where}: unknown keys {sorted(extra)}; known: privileges, priority, limits, allow_fork, "
                          "tools")
    tools = spec.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, str) for t in tools)):
        raise ConfigError(f"{where}.tools: expected a list of tool names, e.g. tools = [\"calculator\"]")
    allow_fork = spec.get("allow_fork", False)
    if not isinstance(allow_fork, bool):
        raise ConfigError(f"{where}.allow_fork: expected true or false")
    privs = spec["privileges"]
    bad = [p for p in privs if p not in PRIVILEGES]
    if bad:
        raise ConfigError(f"{where}: unknown privileges {bad}; known: {list(PRIVILEGES)}")
    priority = spec.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ConfigError(f"{where}.priority: expected an integer")
    limits = spec.get("limits", {})
    if not isinstance(limits, dict):
        raise ConfigError(f"{where}.limits: expected a table")
    for key, value in limits.items():
        if key not in LIMIT_KEYS:
            raise ConfigError(f"{where}.limits: unknown limit {key!r}; known: {', '.join(LIMIT_KEYS)}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{where}.limits.{key}: expected a positive integer")
    return Group(frozenset(privs), priority, dict(limits), allow_fork, None if tools is None else frozenset(tools))


def _mcp(name: str, spec, where: str) -> McpServer:
    """One ``[mcp.NAME]`` section, checked: a name, a command that resolves to a program, sane limits."""
    if not MCP_NAME.fullmatch(name) or not isinstance(spec, dict):
        raise ConfigError(f"{where}: a table, named with 1-32 lower-case letters, digits, '_' or '-' (a letter "
                          "first): its tools are called NAME.TOOL")
    if "name" in spec:
        raise ConfigError(f"{where}: unknown key 'name' (the section's name is the server's)")
    server = McpServer(name=name)
    _fill(server, spec, where)
    if not server.command or not all(isinstance(a, str) and a and "\0" not in a for a in server.command):
        raise ConfigError(f"{where}.command: a list of strings, the program first, e.g. "
                          "command = [\"python\", \"/srv/mcp/notes.py\"]")
    if server.command[0] != "python" and shutil.which(server.command[0]) is None:
        raise ConfigError(f"{where}.command: program {server.command[0]!r} not found (give its absolute path)")
    for key, items in (("read", server.read), ("packages", server.packages)):
        if not all(isinstance(a, str) and a for a in items):
            raise ConfigError(f"{where}.{key}: a list of strings")
    missing = [p for p in server.read if not os.path.isabs(p) or not os.path.exists(p)]
    if missing:
        raise ConfigError(f"{where}.read: {missing} must be absolute paths that exist")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in server.env.items()):
        raise ConfigError(f"{where}.env: a table of strings, e.g. env = {{ LOG_LEVEL = \"info\" }}")
    if server.confirm not in ("destructive", "always", "never"):
        raise ConfigError(f"{where}.confirm: \"destructive\" (tools that do not say readOnlyHint = true or "
                          f"destructiveHint = false), \"always\" or \"never\"; got {server.confirm!r}")
    if min(server.instances, server.memory_mb, server.cpu_seconds, server.queue) < 1 \
            or min(server.timeout_s, server.start_timeout_s) <= 0 or server.instances > 64:
        raise ConfigError(f"{where}: instances (1-64), memory_mb, cpu_seconds and queue must be at least 1, "
                          "timeout_s and start_timeout_s above 0")
    return server


def _check_model(m: ModelSection, where: str) -> None:
    """A ``[models.NAME]`` section's keys fit its kind, with their ranges."""
    if m.kind not in MODEL_KINDS:
        raise ConfigError(f"{where}: kind must be one of {', '.join(MODEL_KINDS)}, got {m.kind!r}")
    if m.kind == "local":
        if not m.path:
            raise ConfigError(f"{where} needs `path = \"FILE.gguf\"` (or `kind = \"openai\"` and `base_url`)")
        return
    if m.path or not m.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: a remote core (kind = \"openai\") takes `base_url = \"http(s)://HOST:PORT/v1\"` "
                          f"and no `path`; got base_url = {m.base_url!r}, path = {m.path!r}")
    if m.api_key_file and m.api_key_env:
        raise ConfigError(f"{where}: give api_key_file or api_key_env, not both")
    if not (1 <= m.concurrency <= 1024 and 0 <= m.agent_concurrency <= m.concurrency and m.tokens_per_s >= 0
            and 0 <= m.retries <= 10 and 1 <= m.breaker_failures <= 1000):
        raise ConfigError(f"{where}: needs concurrency 1..1024, agent_concurrency 0..concurrency, tokens_per_s >= 0, "
                          "retries 0..10, breaker_failures 1..1000")
    if min(m.timeout_s, m.connect_timeout_s, m.breaker_s) <= 0 or max(m.timeout_s, m.connect_timeout_s) > 3600:
        raise ConfigError(f"{where}: timeout_s and connect_timeout_s must be in (0, 3600], breaker_s above 0")
    if m.response_format not in RESPONSE_FORMATS:
        raise ConfigError(f"{where}: response_format must be one of {', '.join(RESPONSE_FORMATS)}, got "
                          f"{m.response_format!r}")


def load(path: str | os.PathLike | None) -> Config:
    """The configuration from ``path`` (TOML) over the defaults; the defaults alone when ``path`` is None."""
    cfg = Config()
    if path is None:
        return cfg
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    for name, values in data.items():
        if name in ("kernel", "llm", "sandbox", "storage", "memory", "access") and isinstance(values, dict):
            if name == "llm" and isinstance(values.get("share_prefix"), bool):  # the old switch: all or nothing
                values = dict(values, share_prefix="all" if values["share_prefix"] else "agent")
            _fill(getattr(cfg, name), values, f"{path}: [{name}]")
        elif name == "groups" and isinstance(values, dict):
            for group, spec in values.items():
                cfg.groups[group] = _group(spec, f"{path}: [groups.{group}]")
        elif name == "models" and isinstance(values, dict):
            for model, spec in values.items():
                where = f"{path}: [models.{model}]"
                if model == "default" or not isinstance(spec, dict):
                    raise ConfigError(f"{where}: a table with `path = ...`; the name 'default' is the [llm] model")
                cfg.models[model] = ModelSection()
                _fill(cfg.models[model], spec, where)
                _check_model(cfg.models[model], where)
        elif name == "mcp" and isinstance(values, dict):
            for server, spec in values.items():
                cfg.mcp[server] = _mcp(server, spec, f"{path}: [mcp.{server}]")
        else:
            raise ConfigError(f"{path}: unknown section [{name}]; known: [kernel], [llm], [sandbox], [storage], [memory], [access], "
                              "[groups.NAME], [models.NAME], [mcp.NAME]")
    sb = cfg.sandbox
    if not (UID_FLOOR <= sb.uid_base and 1 <= sb.uid_count <= 1_000_000 and sb.uid_base + sb.uid_count < 2**31):
        raise ConfigError(f"{path}: [sandbox] uid_base must be at least {UID_FLOOR} (agents must never run as root, "
                          f"a system user or a login user) and uid_count 1..1000000, the range below 2^31; got "
                          f"uid_base = {sb.uid_base}, uid_count = {sb.uid_count}")
    if not 0 <= cfg.kernel.metrics_port <= 65535:
        raise ConfigError(f"{path}: [kernel] metrics_port must be 0 (off) or a TCP port, got {cfg.kernel.metrics_port}")
    if sb.cpu_quota < 0 or cfg.llm.threads < 0 or cfg.kernel.max_procs < 1 or cfg.kernel.drain_s < 0:
        raise ConfigError(f"{path}: [sandbox] cpu_quota, [llm] threads, [kernel] drain_s must be >= 0 (0: none / every CPU), "
                          f"[kernel] max_procs >= 1; got cpu_quota = {sb.cpu_quota}, threads = {cfg.llm.threads}, "
                          f"max_procs = {cfg.kernel.max_procs}")
    if cfg.kernel.max_pending < 1 or cfg.kernel.max_followers < 1:
        raise ConfigError(f"{path}: [kernel] max_pending and max_followers must be at least 1")
    st = cfg.storage
    if min(st.max_value_mb, st.keep_versions, st.keep_mb, st.upload_ttl_s) < 1:
        raise ConfigError(f"{path}: [storage] max_value_mb, keep_versions, keep_mb and upload_ttl_s must be at "
                          "least 1")
    mem = cfg.memory
    if mem.ram_mb < 1 or not 0 <= mem.evict_target <= mem.evict_threshold <= 1:
        raise ConfigError(f"{path}: [memory] needs ram_mb >= 1 and 0 <= evict_target <= evict_threshold <= 1")
    from kernel.tools import BUILTIN_TOOLS
    for gname, group in cfg.groups.items():  # an MCP server's tools are known once it runs: SERVER.* or SERVER.X
        unknown = sorted(t for t in group.tools or () if t not in BUILTIN_TOOLS and t.split(".", 1)[0] not in cfg.mcp)
        if unknown:
            raise ConfigError(f"{path}: [groups.{gname}] tools names unknown tools {unknown}; known: "
                              f"{', '.join(sorted(BUILTIN_TOOLS))}, and SERVER.* or SERVER.TOOL of an [mcp.SERVER]")
    bad = [c for c in cfg.access.confirm if c not in ("delete", "overwrite", "cross_write")]
    if bad or cfg.access.confirm_timeout_s < 1:
        raise ConfigError(f"{path}: [access] confirm takes \"delete\", \"overwrite\", \"cross_write\" (got {bad}) "
                          "and confirm_timeout_s must be at least 1")
    if cfg.kernel.max_frame < 1024:
        raise ConfigError(f"{path}: [kernel] max_frame must be at least 1024 bytes")
    if cfg.llm.n_seq_max < 1 or cfg.llm.n_ctx_seq < 64:
        raise ConfigError(f"{path}: [llm] needs n_seq_max >= 1 and n_ctx_seq >= 64")
    if cfg.llm.scheduler not in POLICIES:
        raise ConfigError(f"{path}: [llm] scheduler must be one of {', '.join(POLICIES)}, got {cfg.llm.scheduler!r}")
    llm = cfg.llm
    if min(llm.max_active, llm.rr_slice, llm.prefill_chunk) < 1 or min(llm.kv_size, llm.swap_ram_mb,
                                                                        llm.swap_disk_mb) < 0:
        raise ConfigError(f"{path}: [llm] needs max_active, rr_slice and prefill_chunk >= 1; kv_size, swap_ram_mb "
                          "and swap_disk_mb >= 0")
    if cfg.llm.kv_layout not in ("auto", "unified", "streams"):
        raise ConfigError(f"{path}: [llm] kv_layout must be auto, unified or streams, got {cfg.llm.kv_layout!r}")
    if cfg.llm.share_prefix not in SHARE_SCOPES:
        raise ConfigError(f"{path}: [llm] share_prefix must be one of {', '.join(SHARE_SCOPES)} (whose cached KV a "
                          f"request may reuse; docs/engine.md), got {cfg.llm.share_prefix!r}")
    if cfg.llm.default_model and cfg.llm.default_model not in cfg.models:
        raise ConfigError(f"{path}: [llm] default_model {cfg.llm.default_model!r} is not a [models.NAME] section")
    return cfg
