"""The kernel's watchdog: when the kernel dies, nothing it started may outlive it.

``Host`` starts ``python -I -m sandbox.watchdog --scratch DIR PARENT_CGROUP...`` with a pipe on stdin the moment
it creates its cgroups.  The watchdog blocks reading that pipe; end of file means the kernel has gone -- closed it on
an orderly shutdown (everything is already cleaned up) or died (SIGKILL, a crash: agents die with it through
PR_SET_PDEATHSIG, but their descendants do not).  Either way it kills every process left in the kernel's
cgroups, removes the groups, detaches the agents' scratch filesystems left under ``DIR``
(``sandbox.scratchfs``), and exits.  It runs in its own session, so signals meant for the kernel's
terminal or process group do not reach it.
"""
from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str]) -> int:
    scratch = None
    if argv[:1] == ["--scratch"]:
        scratch, argv = argv[1], argv[2:]
    parents = argv
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    while True:
        try:
            if not os.read(0, 4096):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    from sandbox import cgroups
    left = cgroups.destroy(parents, timeout=10.0)
    if scratch:
        from sandbox import scratchfs
        for path in scratchfs.mounts_under(scratch):
            try:
                scratchfs.unmount(path)
            except OSError:
                pass  # the kernel's own cleanup got there first
    if left:
        print(f"aiosd watchdog: could not remove {left}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
