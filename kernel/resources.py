"""The resource manager: per-agent limits, accounted with psutil on top of hard OS limits.

Limits come from the agent's privilege group (config) overridden by launch flags (``proc.spawn`` ``limits``).
Hard limits go underneath (rlimits, cgroups where the kernel may create them) because polling alone cannot
stop an allocator; the poll here catches what rlimits cannot express (RSS of a whole process tree, CPU of a
tree, wall time, thread count, disk) and kills with a reason an operator can read
(``"OOMKilled: ..."``).  Token quotas and syscall rates are checked on the syscall path instead
(``charge_syscall``, ``check_tokens``).

Disk usage is the agent's scratch (``kernel.disk``: blocks, inodes, unlinked open files; measured off the
event loop) plus the bytes of its captured output written to its log (``kernel.proc.Output``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import psutil

from kernel.disk import DiskAccountant
from syscalls.errors import EAGAIN, EDQUOT

LIMIT_KEYS = ("memory_mb", "cpu_seconds", "wall_seconds", "procs", "open_files", "disk_mb", "disk_inodes",
              "llm_tokens", "syscall_rate", "storage_mb", "storage_keys")
MB = 1 << 20
SLOW_EVERY_S = 1.0  # the checks that scan /proc (orphans)


def effective_limits(group_limits: dict, overrides: dict | None) -> dict:
    """The group's limits with the launch flags' non-None values on top; every key present (None = none)."""
    limits = {k: group_limits.get(k) for k in LIMIT_KEYS}
    for k, v in (overrides or {}).items():
        if v is not None:
            limits[k] = v
    return limits


@dataclass
class Usage:
    """One accounting sample of an agent's process tree."""
    rss_mb: float = 0.0
    cpu_seconds: float = 0.0
    procs: int = 0
    open_files: int = 0
    disk_mb: float = 0.0      # scratch + captured output
    disk_inodes: int = 0      # files, directories, symlinks... in scratch


class RateBucket:
    """A token bucket: ``rate`` per second, bursts up to ``rate``."""

    __slots__ = ("rate", "tokens", "stamp")

    def __init__(self, rate: int):
        self.rate, self.tokens, self.stamp = rate, float(rate), time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def charge_syscall(proc) -> None:
    """Count one syscall against the agent's rate limit; EAGAIN when it is over."""
    bucket = proc.rate_bucket
    if bucket is not None and not bucket.take():
        raise EAGAIN(f"syscall rate limit ({bucket.rate}/s) exceeded; slow down and retry")


def check_tokens(proc, prompt_tokens: int, max_tokens: int) -> int:
    """The max_tokens the agent's token quota allows for this request; EDQUOT when the prompt alone exceeds."""
    quota = proc.limits.get("llm_tokens")
    if quota is None:
        return max_tokens
    left = quota - proc.prompt_tokens - proc.completion_tokens - proc.reserved_tokens
    if prompt_tokens + 1 > left:
        raise EDQUOT(f"token quota exhausted: {quota - left} of {quota} LLM tokens used or reserved")
    return min(max_tokens, left - prompt_tokens)


def children_map() -> dict[int, list[int]]:
    """ppid -> child pids for every process, from one scan of /proc (psutil's ``children()`` scans all of
    /proc per call: once per agent per sweep would cost the kernel's main thread O(agents x processes))."""
    kids: dict[int, list[int]] = {}
    for p in psutil.process_iter(["ppid"]):
        ppid = p.info["ppid"]
        if ppid is not None:
            kids.setdefault(ppid, []).append(p.pid)
    return kids


def sample(proc, kids: dict[int, list[int]], disk: DiskAccountant | None = None) -> Usage:
    """Account the agent's whole process tree (it and all its descendants, found in ``kids``), and its disk
    usage as ``disk`` last measured it plus its captured output."""
    u = Usage()
    pids, tree = [proc.pid], []
    while pids:
        pid = pids.pop()
        try:
            tree.append(psutil.Process(pid))
        except psutil.Error:
            continue
        pids.extend(kids.get(pid, ()))
    for p in tree:
        try:
            with p.oneshot():
                u.rss_mb += p.memory_info().rss / MB
                t = p.cpu_times()
                u.cpu_seconds += t.user + t.system + t.children_user + t.children_system
                u.procs += p.num_threads()
                u.open_files += p.num_fds()
        except psutil.Error:
            continue
    scratch_bytes, u.disk_inodes = disk.usage(proc.id, tuple(p.pid for p in tree)) if disk else (0, 0)
    u.disk_mb = (scratch_bytes + proc.output.log_bytes) / MB
    return u


def breach(limits: dict, u: Usage, age_s: float) -> str | None:
    """The reason an agent must be killed, or None.  Reasons start with a word an operator can grep."""
    checks = (
        ("memory_mb", u.rss_mb, "OOMKilled", "MB resident"),
        ("cpu_seconds", u.cpu_seconds, "CPULimit", "CPU seconds"),
        ("wall_seconds", age_s, "WallTimeLimit", "seconds alive"),
        ("procs", u.procs, "PidsLimit", "processes+threads"),
        ("open_files", u.open_files, "FileLimit", "open files"),
        ("disk_mb", u.disk_mb, "DiskQuota", "MB in scratch and captured output"),
        ("disk_inodes", u.disk_inodes, "DiskQuota", "inodes in scratch"),
    )
    for key, value, word, unit in checks:
        limit = limits.get(key)
        if limit is not None and value > limit:
            return f"{word}: {value:.0f} {unit} > limit {limit}"
    return None


class ResourceManager:
    """Samples every live agent every ``period`` seconds and names the ones over a limit.  ``disk`` measures
    scratch dirs (and removes them) off the event loop: ``track`` an agent at spawn, ``forget`` it at reap."""

    def __init__(self, period: float = 0.25):
        self.period = period
        self._next = 0.0
        self._next_slow = 0.0
        self.slow_swept = False  # did the last sweep include the once-a-second checks?
        self.disk = DiskAccountant()

    def due(self) -> bool:
        return time.monotonic() >= self._next

    def sweep(self, procs) -> list[tuple[object, str]]:
        """(proc, reason) for each live agent over a limit; records the sample as ``proc.usage_sample``."""
        now = time.monotonic()
        self._next = now + self.period
        self.slow_swept = now >= self._next_slow
        if self.slow_swept:
            self._next_slow = now + SLOW_EVERY_S
        over = []
        wall = time.time()
        kids = children_map() if procs else {}
        for proc in procs:
            u = sample(proc, kids, self.disk)
            u.cpu_seconds += proc.cpu_before  # cpu_seconds and wall_seconds count its whole restart chain
            proc.usage_sample, proc.cpu_seconds = u, u.cpu_seconds
            reason = breach(proc.limits, u, wall - proc.started_at + proc.wall_before)
            if reason:
                over.append((proc, reason))
        return over
