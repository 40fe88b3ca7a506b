"""Disk accounting of agents' scratch directories, and their removal, off the kernel's event loop.

What an agent has on disk is the bytes *allocated* in its scratch directory (blocks, so sparse files count for
what they use, directories for theirs) plus its files' inodes, files it unlinked but still holds open included;
``kernel.resources`` adds its captured output (the kernel-side log) and checks ``disk_mb`` and ``disk_inodes``.

Two ways to measure, per agent:

* **tmpfs** (a root kernel, ``sandbox.scratchfs``): the scratch dir is a filesystem of its own, which counts
  everything itself; ``usage`` is one ``statvfs()`` on the caller's thread, O(1) whatever the number of files.
* **walk** (otherwise): a background thread walks the directory about once a second, counting ``st_blocks``
  of files *and* directories, one inode per entry (hard links once), and the regular files on the scratch's
  filesystem that the agent's processes hold open with no name left (``st_nlink == 0``, found through
  ``/proc/<pid>/fd``).  A walk stops early -- and reports over the limit -- once it has counted more inodes or
  bytes than the agent may have, so an agent cannot make its own walk slow.  The event loop only reads the
  latest result.

The same single thread removes the scratch dirs of ended agents (detaching their tmpfs first), so neither a
walk nor an ``rmtree`` of 200,000 files ever runs on the event loop, which never waits for this thread.
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import shutil
import stat
import threading
import time
from dataclasses import dataclass

from sandbox import scratchfs

log = logging.getLogger("aiosd.disk")

WALK_EVERY_S = 1.0
MB = 1 << 20


@dataclass
class _Tracked:
    scratch: str
    mounted: bool
    max_bytes: int | None
    max_inodes: int | None
    pids: tuple[int, ...] = ()                 # the agent's process tree, as the event loop last saw it
    walked: tuple[int, int] = (0, 0)           # the latest walk: (bytes, inodes)


class DiskAccountant:
    """Per-agent scratch usage; the walks and removals run on one daemon thread, started on first use."""

    def __init__(self, walk_every_s: float = WALK_EVERY_S):
        self.walk_every_s = walk_every_s
        self._tracked: dict[int, _Tracked] = {}    # replaced, never mutated: the worker reads it unlocked
        self._removals: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None

    # --- the event loop's side -----------------------------------------------------------------------
    def track(self, agent_id: int, scratch, limits: dict, mounted: bool) -> None:
        """Account the agent whose scratch dir is ``scratch``; ``mounted``: it is a tmpfs of its own.  Agents
        with neither a ``disk_mb`` nor a ``disk_inodes`` limit are not measured."""
        if not mounted and not limits.get("disk_mb") and not limits.get("disk_inodes"):
            return
        disk_mb = limits.get("disk_mb")
        entry = _Tracked(str(scratch), mounted, disk_mb * MB if disk_mb else None, limits.get("disk_inodes"))
        self._tracked = {**self._tracked, agent_id: entry}
        self._start()

    def usage(self, agent_id: int, pids: tuple[int, ...]) -> tuple[int, int]:
        """(bytes, inodes) the agent has in scratch: measured now for a tmpfs, else the latest walk.
        ``pids``: its process tree now (the next walk looks for unlinked open files there)."""
        entry = self._tracked.get(agent_id)
        if entry is None:
            return 0, 0
        entry.pids = pids
        if entry.mounted:
            try:
                return scratchfs.usage(entry.scratch)
            except OSError:
                return entry.walked
        return entry.walked

    def forget(self, agent_id: int, scratch, unmount: bool) -> None:
        """The agent has ended: stop measuring it and remove ``scratch`` in the background (detaching its
        tmpfs first when ``unmount``)."""
        if agent_id in self._tracked:
            self._tracked = {k: v for k, v in self._tracked.items() if k != agent_id}
        self._removals.append((str(scratch), unmount))
        self._start()
        self._wake.set()

    def close(self, timeout: float = 5.0) -> None:
        """Finish the queued removals (waiting at most ``timeout``), then stop the thread."""
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("scratch dirs still being removed at shutdown; the next kernel removes the rest")

    # --- the worker ----------------------------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None and not self._closing:
            self._thread = threading.Thread(target=self._run, name="aiosd-disk", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        next_walk = 0.0
        while True:
            self._wake.wait(max(0.0, next_walk - time.monotonic()))
            self._wake.clear()
            while self._removals:
                path, unmount = self._removals.popleft()
                _remove(path, unmount)
            if self._closing:
                return
            if time.monotonic() >= next_walk:
                for entry in list(self._tracked.values()):
                    if not entry.mounted:
                        try:
                            entry.walked = walk(entry.scratch, entry.pids, entry.max_bytes, entry.max_inodes)
                        except Exception:  # never let one odd directory stop every agent's accounting
                            log.exception("disk: walking %s failed", entry.scratch)
                next_walk = time.monotonic() + self.walk_every_s


def walk(path: str, pids=(), max_bytes: int | None = None, max_inodes: int | None = None) -> tuple[int, int]:
    """(bytes allocated, inodes) under ``path``: every file's and directory's ``st_blocks`` (``path``'s own
    too: a directory of many entries grows), one inode per entry below ``path`` (hard links once), and regular
    files on ``path``'s filesystem that a process in ``pids`` holds open after unlinking them.  Stops as soon
    as either count exceeds its maximum (the result then exceeds it too)."""
    try:
        root = os.lstat(path)
    except OSError:
        return 0, 0
    total, inodes = root.st_blocks * 512, 0
    linked: set[int] = set()
    stack = [path]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    if st.st_ino in linked:
                        continue
                    linked.add(st.st_ino)
                inodes += 1
                total += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
                if (max_inodes is not None and inodes > max_inodes) or (max_bytes is not None and total > max_bytes):
                    return total, inodes
    unlinked: set[int] = set()
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or not ours to read (an unprivileged kernel; docs/sandbox.md)
            continue
        for fd in fds:
            try:
                st = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if (st.st_nlink == 0 and stat.S_ISREG(st.st_mode) and st.st_dev == root.st_dev
                    and st.st_ino not in unlinked):
                unlinked.add(st.st_ino)
                inodes += 1
                total += st.st_blocks * 512
    return total, inodes


def _remove(path: str, unmount: bool) -> None:
    if unmount:
        try:
            scratchfs.unmount(path)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: not mounted (any more: the watchdog at shutdown)
                log.warning("cannot detach the scratch mount %s: %s", path, exc.strerror or exc)
    shutil.rmtree(path, ignore_errors=True)
