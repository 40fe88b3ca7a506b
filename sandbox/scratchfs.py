"""A filesystem of its own for each agent's scratch directory: a tmpfs mounted there by a root kernel.

The mount makes the filesystem itself the accountant and the wall: ``size`` bounds the bytes an agent's files
take (unlinked files it still holds open included) and ``nr_inodes`` the files + directories + symlinks it may
create, and one ``statvfs()`` reads both, whatever the number of files (``usage``).  The kernel mounts it
(``mount(2)``, through ctypes); agents may not mount anything (seccomp).  Options: ``size=<MiB>m``,
``nr_inodes=<n>``, ``mode=0700``, ``nosuid``, ``nodev``.  ``unmount`` detaches it (``MNT_DETACH``) when the
agent has been reaped; the last reference frees its pages.  A kernel killed before that leaves its mounts
behind: ``mounts_under`` finds them for the next kernel on the same runtime dir.

tmpfs pages are memory: with cgroups they are charged to the agent's memory cgroup too (docs/sandbox.md).
"""
from __future__ import annotations

import ctypes
import os
import tempfile

from sandbox.linux import libc_call

MS_NOSUID, MS_NODEV = 2, 4
MNT_DETACH = 2
FSTYPE = b"tmpfs"
SOURCE = b"aiosd-scratch"


def unavailable_reason(probe_dir: str) -> str | None:
    """None when this process can mount a tmpfs (tried once, on a directory made inside ``probe_dir``, and
    undone), else why not."""
    if os.geteuid() != 0:
        return "needs root (the kernel is not running as root)"
    try:
        path = tempfile.mkdtemp(prefix=".mount-probe-", dir=probe_dir)
    except OSError as exc:
        return f"cannot make a probe directory in {probe_dir}: {exc.strerror or exc}"
    try:
        mount(path, size_mb=1, inodes=16)
        unmount(path)
    except OSError as exc:
        return f"mount(2) of a tmpfs failed: {exc.strerror or exc}"
    finally:
        try:
            os.rmdir(path)
        except OSError:
            pass
    return None


def mount(path: str, size_mb: int, inodes: int | None) -> str:
    """Mount a fresh tmpfs of ``size_mb`` MiB and ``inodes`` inodes (None: tmpfs's default) on ``path``, mode
    0700, nosuid, nodev; return a description for operators.  Raises OSError."""
    data = f"size={size_mb}m,mode=0700" + (f",nr_inodes={inodes}" if inodes else "")
    libc_call("mount", SOURCE, os.fsencode(path), FSTYPE, ctypes.c_ulong(MS_NOSUID | MS_NODEV), data.encode())
    return f"tmpfs {size_mb} MiB" + (f", {inodes} inodes" if inodes else "")


def unmount(path: str) -> None:
    """Detach the mount on ``path`` (lazily: files still open keep it alive until they are closed).  Raises
    OSError (EINVAL when nothing is mounted there)."""
    libc_call("umount2", os.fsencode(path), ctypes.c_int(MNT_DETACH))


def usage(path: str) -> tuple[int, int]:
    """(bytes allocated, inodes in use) of the filesystem mounted on ``path``, its root directory excluded."""
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize, max(0, st.f_files - st.f_ffree - 1)


def mounts_under(prefix: str) -> list[str]:
    """Mount points strictly below ``prefix`` in this process's mount namespace, deepest first."""
    prefix = os.path.realpath(prefix).rstrip("/") + "/"
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4:
                    point = _unescape(fields[4])
                    if point.startswith(prefix):
                        found.append(point)
    except OSError:
        return []
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)
