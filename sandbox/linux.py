"""Thin ctypes wrappers over the Linux process controls aiosd uses (``prctl``, raw ``syscall``).

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
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

MACHINE = os.uname().machine
X86_64 = MACHINE == "x86_64"

# Syscall numbers this package calls directly.  landlock_* and seccomp are the same on x86_64 and aarch64
# except seccomp (317 / 277).
NR_SECCOMP = {"x86_64": 317, "aarch64": 277}.get(MACHINE)
NR_LANDLOCK_CREATE_RULESET, NR_LANDLOCK_ADD_RULE, NR_LANDLOCK_RESTRICT_SELF = 444, 445, 446


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    ret = _prctl(option, arg2, arg3, arg4, arg5)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")
    return ret


def syscall(nr: int, *args) -> int:
    """A raw system call; ``args`` are ints or ctypes pointers.  Raises OSError on a -1 return."""
    conv = [a if not isinstance(a, int) else ctypes.c_long(a) for a in args]
    ret = _syscall(ctypes.c_long(nr), *conv)
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def libc_call(name: str, *args) -> int:
    """A libc function returning int, -1 on error (errno) -> OSError."""
    ret = getattr(_libc, name)(*args)
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return ret


def die_with_parent(expected_parent: int) -> None:
    """Get SIGKILL when the parent dies; exit now if it already has (the race before the prctl)."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != expected_parent:
        os._exit(1)


def become_subreaper() -> None:
    """Orphaned descendants are re-parented to this process instead of init, so it can tell and reap them."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)
