"""What the kernel asks of an agent's sandbox, and the order in which the bootstrap applies it.

The kernel builds a ``Policy`` per agent and hands it to the child as JSON in ``AIOSD_SANDBOX``; the
bootstrap calls ``apply(policy, connect)`` before any agent code runs.  Every layer is detected at run time and
reports ``"on"`` (possibly with detail) or ``"off: <reason>"``; the report is attested to the kernel
(``proc.ready``) and shown by ``aiosctl ps`` and ``proc.self``.

Order matters:
  1. join the agent's cgroups and unshare network + IPC namespaces   (needs root; before dropping it)
  2. rlimits
  3. Landlock                  (restricts only the calling thread: before ZeroMQ starts its I/O thread)
  4. ``connect()``             (the kernel socket is in a 0700 dir: connect before dropping the uid)
  5. switch to the agent's own uid/gid                    (glibc applies it to every thread)
  6. no_new_privs, not dumpable
  7. seccomp, last, with TSYNC  (it forbids what the steps above needed)
"""
from __future__ import annotations

import json
import os
import resource
from dataclasses import asdict, dataclass, field
from typing import Callable

ENV = "AIOSD_SANDBOX"

RLIMITS = {
    "AS": resource.RLIMIT_AS, "CPU": resource.RLIMIT_CPU, "NOFILE": resource.RLIMIT_NOFILE,
    "FSIZE": resource.RLIMIT_FSIZE, "CORE": resource.RLIMIT_CORE, "NPROC": resource.RLIMIT_NPROC,
}


@dataclass
class Policy:
    scratch: str
    rlimits: dict[str, int] = field(default_factory=dict)   # name in RLIMITS -> limit (soft = hard)
    uid: int | None = None                                   # switch to this uid/gid (kernel runs as root)
    gid: int | None = None
    netns: bool = True                                       # unshare network + IPC namespaces when root
    cgroup_procs: list[str] = field(default_factory=list)    # cgroup.procs files to write our pid into
    landlock_read: list[str] = field(default_factory=list)   # read(+exec) hierarchies
    landlock_write: list[str] = field(default_factory=list)  # read-write hierarchies
    seccomp: bool = True
    allow_fork: bool = False                                 # seccomp: may the agent create processes?

    def to_env(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_env(cls, text: str) -> "Policy":
        return cls(**json.loads(text))


Report = dict[str, str]


def _layer(report: Report, name: str, fn: Callable[[], str | None]) -> None:
    """Run one layer; record "on[: detail]" or "off: reason" (an OSError is a reason, not a crash)."""
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
    """Apply every layer of ``policy`` to this process, calling ``connect()`` at step 4; return the report."""
    from sandbox import cgroups, identity, landlock, namespaces, seccomp

    report: Report = {}
    root = os.geteuid() == 0
    _layer(report, "cgroup", lambda: cgroups.join(policy.cgroup_procs))
    _layer(report, "netns", lambda: namespaces.isolate(policy.netns, root))
    _layer(report, "rlimits", lambda: set_rlimits(policy.rlimits))
    _layer(report, "landlock", lambda: landlock.restrict(policy.landlock_read, policy.landlock_write))
    connect()
    _layer(report, "uid", lambda: identity.switch(policy.uid, policy.gid))
    _layer(report, "prctl", no_privileges)
    _layer(report, "seccomp",
           lambda: seccomp.install(allow_fork=policy.allow_fork) if policy.seccomp else _off("not requested"))
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


MB = 1 << 20
AS_HEADROOM_MB = 512  # address space beyond the RSS budget: thread stacks, arenas and mappings are virtual


def build(scratch: str, limits: dict, *, uid: int | None = None, gid: int | None = None,
          cgroup_procs: list[str] | None = None, allow_fork: bool = False) -> Policy:
    """The policy for one agent from its effective limits (names as in the ABI's ``limits``; None = none).

    Hard OS limits go underneath the kernel's psutil accounting: polling alone cannot stop an allocator.
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
    return Policy(scratch=scratch, rlimits=rl, uid=uid, gid=gid, cgroup_procs=list(cgroup_procs or []),
                  landlock_read=[], landlock_write=[scratch], allow_fork=allow_fork)
