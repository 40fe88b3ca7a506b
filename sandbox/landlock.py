"""Landlock: filesystem rules, TCP rules and IPC scopes for the agent, in ctypes.

The agent may read (and map executable) the hierarchies in ``read`` and read-write the ones in ``write`` (its
scratch dir); every other path is out of reach, whatever the file modes say -- which matters most when the
agent keeps the kernel's uid.  Rights are handled by what the running kernel's Landlock ABI knows:

- ABI 1: execute, read/write files, read dirs, remove, make (char, dir, reg, sock, fifo, block, sym);
- ABI 2: REFER (link/rename across directories) -- a hard link to a file outside the agent's hierarchy fails;
- ABI 3: TRUNCATE;  ABI 5: IOCTL_DEV (ioctl on devices opened after the sandbox);
- ABI 4: TCP bind and connect are handled with no rule: every TCP port is denied (UDP is not covered by
  Landlock; the seccomp socket filter refuses non-unix sockets);
- ABI 6: scopes: no abstract unix socket outside the agent's own domain, no signal to a process outside it
  (the kernel, other agents, anything else);
- ABI 9: pathname unix sockets are mediated (RESOLVE_UNIX): the kernel's socket gets a rule.  Before ABI 9 a
  pathname unix socket is reachable if its file is (Landlock does not see ``connect``); the seccomp filter
  cannot tell sockets apart either -- the known gap is documented in docs/sandbox.md.

Landlock restricts the calling thread and its future children only: ``restrict`` must run before ZeroMQ
starts its I/O thread (``sandbox.policy.apply`` keeps that order).  It sets ``no_new_privs`` first, which an
unprivileged process needs for ``landlock_restrict_self``.
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat

from sandbox import linux
from sandbox.layer import LayerUnavailable

CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH = 1

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13          # ABI 2
FS_TRUNCATE = 1 << 14       # ABI 3
FS_IOCTL_DEV = 1 << 15      # ABI 5
FS_RESOLVE_UNIX = 1 << 16   # ABI 9

NET_BIND_TCP = 1 << 0       # ABI 4
NET_CONNECT_TCP = 1 << 1

SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0   # ABI 6
SCOPE_SIGNAL = 1 << 1

FS_ABI1 = (1 << 13) - 1
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
READ_RIGHTS = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
# what an agent may do in its scratch dir: everything but device nodes
WRITE_RIGHTS = (FS_ABI1 & ~(FS_MAKE_CHAR | FS_MAKE_BLOCK)) | FS_REFER | FS_TRUNCATE


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def abi_version() -> int:
    """The running kernel's Landlock ABI version; 0 when Landlock is absent or disabled."""
    try:
        return linux.syscall(linux.NR_LANDLOCK_CREATE_RULESET, None, 0, CREATE_RULESET_VERSION)
    except OSError:
        return 0


def available(abi: int | None = None) -> str | None:
    """None when this kernel has Landlock (``abi``: its ABI version, if known), else why not."""
    abi = abi_version() if abi is None else abi
    if abi <= 0:
        return "Landlock is not enabled in this kernel (needs Linux >= 5.13 with lsm=...,landlock)"
    return None


def handled_fs(abi: int) -> int:
    rights = FS_ABI1
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    if abi >= 9:
        rights |= FS_RESOLVE_UNIX
    return rights


def apply(policy) -> str:
    """Restrict this thread to the policy's ``landlock_read``/``landlock_write``/``landlock_list`` paths and its
    ``unix_sockets`` (see ``restrict``)."""
    return restrict(policy.landlock_read, policy.landlock_write, policy.landlock_list, policy.unix_sockets)


def restrict(read: list[str], write: list[str], listed: list[str] = (), unix_sockets: list[str] = ()) -> str:
    """Restrict this thread (and what it starts later) to ``read``/``write`` hierarchies; see the module doc.

    ``listed``: directories whose entries (names only, recursively) may be listed, e.g. site-packages.

    ``unix_sockets``: pathname sockets the agent must reach (the kernel's), ruled only when the ABI mediates
    them (>= 9).  Paths that do not exist are skipped.
    """
    abi = abi_version()
    why = available(abi)
    if why:
        raise LayerUnavailable(why)
    fs = handled_fs(abi)
    attr = _RulesetAttr(handled_access_fs=fs)
    size = 8
    parts = ["fs"]
    if abi >= 4:
        attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP
        size = 16
        parts.append("tcp")
    if abi >= 6:
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        size = 24
        parts.append("scopes")
    ruleset = linux.syscall(linux.NR_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0)
    try:
        for path in read:
            _add_path(ruleset, path, READ_RIGHTS & fs)
        for path in listed:
            _add_path(ruleset, path, FS_READ_DIR)
        for path in write:
            _add_path(ruleset, path, WRITE_RIGHTS & fs)
        if abi >= 9:
            for path in unix_sockets:
                # a rule on the socket file itself; a kernel that takes the right only on directories gets
                # the socket's directory (the runtime dir: the kernel socket is the only socket there)
                if not _add_path(ruleset, path, FS_RESOLVE_UNIX, strict=True):
                    _add_path(ruleset, os.path.dirname(path), FS_RESOLVE_UNIX)
            parts.append("unix")
        linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
        linux.syscall(linux.NR_LANDLOCK_RESTRICT_SELF, ruleset, 0)
    finally:
        os.close(ruleset)
    return f"ABI {abi}, " + "+".join(parts)


def _add_path(ruleset: int, path: str, rights: int, strict: bool = False) -> bool:
    """Add one path-beneath rule; False when ``path`` does not exist (or, ``strict``, the kernel refuses).
    (Called a few hundred times per agent: kept to one open, one fstat and one syscall.)"""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= FILE_RIGHTS | FS_RESOLVE_UNIX
        _RULE.allowed_access, _RULE.parent_fd = rights, fd
        if _add_rule(_NR_ADD_RULE, ctypes.c_long(ruleset), _RULE_PATH_BENEATH, _RULE_REF, _ZERO) != 0:
            err = ctypes.get_errno()
            if strict and err == errno.EINVAL:
                return False
            raise OSError(err, f"landlock rule for {path}: {os.strerror(err)}")
        return True
    finally:
        os.close(fd)


_RULE = _PathBeneathAttr()
_RULE_REF = ctypes.byref(_RULE)
_NR_ADD_RULE = ctypes.c_long(linux.NR_LANDLOCK_ADD_RULE)
_RULE_PATH_BENEATH, _ZERO = ctypes.c_long(RULE_PATH_BENEATH), ctypes.c_long(0)
_add_rule = linux._syscall
