"""What the kernel asks of an agent's sandbox, and the order in which the bootstrap applies it.

This module is the orchestrator, as nsjail's ``contain.cc``: every layer is a module of its own with the same
entry points (``available()``, ``apply(policy)``: ``sandbox.layer``), and the edges run one way -- this module
imports the layers, no layer imports it.

The kernel builds a ``Policy`` per agent (``sandbox.host.Host.prepare``) and hands it to the child as JSON in
``AIOSD_SANDBOX``; the bootstrap calls ``apply(policy, connect)`` before any agent code runs.  Every layer is
detected at run time and reports ``"on"`` (possibly with detail) or ``"off: <reason>"``; the report is attested
to the kernel (``proc.ready``) and shown by ``aiosctl ps`` and ``proc.self``.  docs/sandbox.md describes each
layer, what it stops and what it needs.

Order matters:
  1. ``cgroup``: join the agent's cgroups              (while we still may write there)
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

from typing import Callable

import msgpack

from sandbox.layer import LayerUnavailable

ENV = "AIOSD_SANDBOX"

_FIELDS = {  # name -> default (a type is called for a fresh empty value)
    "scratch": None,
    "rlimits": dict,        # name in sandbox.rlimits.RLIMITS -> limit (soft = hard)
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
    "sys_path": list,       # directories appended to the agent's sys.path (an operator's venv: site-packages)
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
CONNECT = "connect"  # the step of LAYERS where the bootstrap's connect() runs


def _layers() -> tuple:
    """(report name, module) in the order they are applied (the module docstring says why this order)."""
    from sandbox import caps, cgroups, identity, landlock, namespaces, prctl, rlimits, seccomp
    return (("cgroup", cgroups), ("netns", namespaces), ("rlimits", rlimits), ("landlock", landlock),
            ("caps", caps), (CONNECT, None), ("uid", identity), ("prctl", prctl), ("seccomp", seccomp))


def apply(policy: Policy, connect: Callable[[], None]) -> Report:
    """Apply every layer of ``policy`` to this process, calling ``connect()`` at step 6; return the report:
    per layer "on[: detail]" or "off: reason" (a layer the kernel could not prepare is off with its reason; an
    OSError is a reason, not a crash)."""
    report: Report = {}
    for name, layer in _layers():
        if layer is None:
            connect()
        elif name in policy.off:
            report[name] = f"off: {policy.off[name]}"
        else:
            try:
                detail = layer.apply(policy)
                report[name] = "on" + (f": {detail}" if detail else "")
            except LayerUnavailable as exc:
                report[name] = f"off: {exc}"
            except OSError as exc:
                report[name] = f"off: {exc.strerror or exc}"
    return report


def build(scratch: str, limits: dict, *, uid: int | None = None, gid: int | None = None,
          cgroup_procs: list[str] | None = None, allow_fork: bool = False, allow_connect: bool | None = None,
          read: list[str] | None = None, listed: list[str] | None = None,
          unix_sockets: list[str] | None = None, off: dict[str, str] | None = None,
          allow_exec: bool = False, network: bool = False, read_only: bool = False) -> Policy:
    """The policy for one agent from its effective limits (names as in the ABI's ``limits``; None = none).

    Hard OS limits go underneath the kernel's psutil accounting: polling alone cannot stop an allocator.
    ``read``/``listed`` default to ``sandbox.paths.default_read_paths()``; the agent may write its scratch dir
    only (and not even that when ``read_only``).  Runs in the kernel (and in tests), never in the agent.
    """
    from sandbox import paths, rlimits
    rl = rlimits.plan(limits, own_uid=uid is not None)
    if read is None or listed is None:
        default_read, default_listed = paths.default_read_paths()
        read = list(default_read) if read is None else read
        listed = list(default_listed) if listed is None else listed
    return Policy(scratch=scratch, rlimits=rl, uid=uid, gid=gid, cgroup_procs=list(cgroup_procs or []),
                  landlock_read=list(read) + ([scratch] if read_only else []), landlock_list=list(listed),
                  landlock_write=[*([] if read_only else [scratch]), *paths.SYSTEM_WRITE], unix_sockets=list(unix_sockets or []),
                  allow_fork=allow_fork, allow_connect=True if network else allow_connect,
                  allow_exec=allow_exec, network=network, netns=not network, off=dict(off or {}))
