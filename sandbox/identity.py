"""Who the agent runs as: its own uid/gid from the kernel's pool, or -- when that cannot be -- the kernel's uid
with every capability dropped.

A root kernel gives each agent a uid/gid of its own (``[sandbox] uid_base``/``uid_count``), so the ordinary
Unix permission checks, RLIMIT_NPROC and the kernel's peer credentials all tell agents apart.  That needs the
interpreter and the SDK to be readable by "other": a Python installed under a 0700 home (pyenv in
``/root``) cannot be run by another uid, and ``switch_blocker`` says so.  Then the agent stays root but drops
all capabilities (``sandbox.caps``): root without capabilities is an ordinary user that happens to own
root's files -- which is why Landlock carries the filesystem boundary in that case.
"""
from __future__ import annotations

import os
import stat

from sandbox.layer import LayerUnavailable


def available() -> str | None:
    return None if os.geteuid() == 0 else "needs root (the kernel is not running as root)"


def apply(policy) -> str:
    return switch(policy.uid, policy.gid)


def switch(uid: int | None, gid: int | None) -> str:
    """Become ``uid``/``gid`` with no supplementary groups (glibc applies it to every thread)."""
    if uid is None:
        raise LayerUnavailable("no uid pool (needs a root kernel); the agent shares the kernel's uid")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    return f"uid {uid} gid {gid}"


def switch_blocker(paths: list[str]) -> str | None:
    """Why an agent of another uid could not run (None if it could): every directory from ``/`` down to each
    of ``paths`` must be searchable by "other", and each path itself readable by "other"."""
    seen = set()
    for path in paths:
        path = os.path.realpath(path)
        parts = path.split(os.sep)
        for i in range(2, len(parts) + 1):
            d = os.sep.join(parts[:i]) or os.sep
            if d in seen:
                continue
            seen.add(d)
            try:
                mode = os.stat(d).st_mode
            except OSError as exc:
                return f"cannot stat {d}: {exc.strerror}"
            if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
                return (f"{d} (mode {stat.S_IMODE(mode):04o}) is not searchable by other uids, and the "
                        f"Python installation or the SDK lies beneath it")
            if d == path and not mode & stat.S_IROTH:
                return f"{d} (mode {stat.S_IMODE(mode):04o}) is not readable by other uids"
    return None
