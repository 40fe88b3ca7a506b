"""Process controls: ``no_new_privs`` (setuid binaries no longer elevate) and not dumpable (no
``/proc/<pid>/mem`` or ptrace for peers of the same uid).  Applied after the uid switch, which would reset
dumpable."""
from __future__ import annotations

from sandbox import linux


def available() -> str | None:
    return None  # both prctls exist since Linux 3.5


def apply(policy) -> str:
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    linux.prctl(linux.PR_SET_DUMPABLE, 0)
    return "no_new_privs, not dumpable"
