"""Capabilities: every one of them dropped from the agent -- bounding set, ambient set, effective, permitted,
inheritable -- with the securebits locked, so that root without capabilities is an ordinary user that happens
to own root's files (Landlock then carries the filesystem boundary).  A root kernel that switches the agent's
uid keeps CAP_SETUID/CAP_SETGID until ``sandbox.identity`` uses them (the switch clears them).  Capabilities
are per thread: applied before ZeroMQ starts its threads, which inherit the result.
"""
from __future__ import annotations

import ctypes

from sandbox import linux

CAP_SETGID, CAP_SETUID, CAP_SETPCAP = 6, 7, 8
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# securebits: root gets no capabilities on exec; no keep-caps; no ambient raise -- all locked
SECBITS = (1 << 0) | (1 << 1) | (1 << 5) | (1 << 6) | (1 << 7)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def available() -> str | None:
    return None  # dropping what one holds needs nothing


def apply(policy) -> str:
    return drop_capabilities(keep_setid=policy.uid is not None)


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
