"""Who the agent runs as: its own uid/gid from the kernel's pool, or -- when that cannot be -- the kernel's uid
with every capability dropped.

A root kernel gives each agent a uid/gid of its own (``[sandbox] uid_base``/``uid_count``), so the ordinary
Unix permission checks, RLIMIT_NPROC and the kernel's peer credentials all tell agents apart.  That needs the
interpreter and the SDK to be readable by "other": a Python installed under a 0700 home (pyenv in
``/root``) cannot be run by another uid, and ``switch_blocker`` says so.  Then the agent stays root but drops
all capabilities (``drop_capabilities``): root without capabilities is an ordinary user that happens to own
root's files -- which is why Landlock carries the filesystem boundary in that case.
"""
from __future__ import annotations

import ctypes
import os
import stat
import sys

from sandbox import linux
from sandbox.policy import LayerUnavailable

CAP_SETGID, CAP_SETUID, CAP_SETPCAP = 6, 7, 8
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# securebits: root gets no capabilities on exec; no keep-caps; no ambient raise -- all locked
SECBITS = (1 << 0) | (1 << 1) | (1 << 5) | (1 << 6) | (1 << 7)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


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


def interpreter_paths() -> list[str]:
    """What an agent of another uid must be able to read: the Python installation, the venv, the SDK."""
    import agentproc
    import sandbox
    import syscalls
    paths = [sys.base_prefix, sys.prefix, os.path.realpath(sys.executable)]
    paths += [os.path.dirname(m.__file__) for m in (agentproc, syscalls, sandbox)]
    return paths


def _capget() -> tuple[_CapHeader, tuple[_CapData, _CapData]]:
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    linux.libc_call("capget", ctypes.byref(hdr), data)
    return hdr, data


def drop_capabilities(keep_setid: bool = False) -> str:
    """Drop every capability of this thread: bounding set, ambient set, effective/permitted/inheritable.

    Runs before ZeroMQ starts its threads (capabilities are per thread; new threads inherit them).
    ``keep_setid``: keep CAP_SETUID/CAP_SETGID in effective+permitted for the uid switch that follows,
    which clears them.
    """
    _, data = _capget()
    held = any(d.effective or d.permitted or d.inheritable for d in data)
    if not held:
        return "none held"
    dropped_bounding = False
    if data[0].effective & (1 << CAP_SETPCAP):
        try:
            linux.prctl(linux.PR_SET_SECUREBITS, SECBITS)
        except OSError:
            pass
        cap = 0
        while True:
            try:
                linux.prctl(linux.PR_CAPBSET_DROP, cap)
            except OSError:
                break  # EINVAL: past the last capability this kernel knows
            cap += 1
        dropped_bounding = True
    try:
        linux.prctl(linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError:
        pass  # kernels before 4.3 have no ambient set
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    new = (_CapData * 2)()
    if keep_setid:
        new[0].effective = new[0].permitted = (1 << CAP_SETUID) | (1 << CAP_SETGID)
    linux.libc_call("capset", ctypes.byref(hdr), new)
    what = "all dropped" if not keep_setid else "all but setuid/setgid dropped (the uid switch drops those)"
    return what + ("" if dropped_bounding else "; bounding set kept (no CAP_SETPCAP)")
