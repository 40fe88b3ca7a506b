"""Network and IPC namespaces: an agent in its own has no network interface but a loopback that is down, and
no System V IPC or POSIX message queue shared with anyone.  ZeroMQ ``ipc://`` keeps working: a pathname unix
socket is found through the filesystem, not the network namespace.

As root, ``unshare(CLONE_NEWNET | CLONE_NEWIPC)``.  Unprivileged, the same inside a new user namespace that
maps only the agent's own uid and gid (``setgroups`` denied); the capabilities that namespace grants are
dropped again by the ``caps`` layer.  Must run while the process is single-threaded (before ZeroMQ).
"""
from __future__ import annotations

import os

from sandbox import linux
from sandbox.layer import LayerUnavailable

CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000


def available() -> str | None:
    """None when this process may unshare its namespaces: as root, or where unprivileged user namespaces are
    allowed (as far as sysctls say); else why not."""
    if os.geteuid() == 0:
        return None
    for path, bad in (("/proc/sys/user/max_user_namespaces", "0"),
                      ("/proc/sys/kernel/unprivileged_userns_clone", "0")):
        try:
            with open(path) as f:
                if f.read().strip() == bad:
                    return f"needs root ({path} is {bad})"
        except OSError:
            pass
    return None


def apply(policy) -> str:
    return isolate(policy.netns, os.geteuid() == 0)


def isolate(requested: bool, root: bool) -> str:
    if not requested:
        raise LayerUnavailable("not requested")
    if root:
        linux.libc_call("unshare", CLONE_NEWNET | CLONE_NEWIPC)
        return "net, ipc"
    why = available()
    if why:
        raise LayerUnavailable(why)
    uid, gid = os.geteuid(), os.getegid()
    try:
        linux.libc_call("unshare", CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWIPC)
    except OSError as exc:
        raise LayerUnavailable(f"needs root (unprivileged user namespaces refused: {exc.strerror})") from None
    linux.prctl(linux.PR_SET_DUMPABLE, 1)  # /proc/self/*_map are writable only while dumpable
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    return "user, net, ipc"
