"""Thin ctypes wrappers over the Linux process controls aiosd uses (``prctl``).

Each function raises ``OSError`` with errno on failure.  Importing this module costs one ``CDLL`` lookup.
"""
from __future__ import annotations

import ctypes
import os
import signal

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38


def prctl(option: int, arg2: int = 0) -> None:
    if _prctl(option, arg2, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def die_with_parent(expected_parent: int) -> None:
    """Get SIGKILL when the parent dies; exit now if it already has (the race before the prctl)."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != expected_parent:
        os._exit(1)


def become_subreaper() -> None:
    """Orphaned descendants are re-parented to this process instead of init, so it can tell and reap them."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)
