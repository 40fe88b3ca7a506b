"""Resource limits (``setrlimit``): hard OS limits under the kernel's psutil accounting, because polling alone
cannot stop an allocator.

``plan`` turns an agent's limits (names as in the ABI's ``limits``) into rlimits, in the kernel; ``apply``
sets them in the agent (soft = hard, never above the current hard limit).
"""
from __future__ import annotations

import resource

RLIMITS = {
    "AS": resource.RLIMIT_AS, "CPU": resource.RLIMIT_CPU, "NOFILE": resource.RLIMIT_NOFILE,
    "FSIZE": resource.RLIMIT_FSIZE, "CORE": resource.RLIMIT_CORE, "NPROC": resource.RLIMIT_NPROC,
}
MB = 1 << 20
AS_HEADROOM_MB = 512  # address space beyond the RSS budget: thread stacks, arenas and mappings are virtual


def plan(limits: dict, own_uid: bool) -> dict[str, int]:
    """{rlimit name: value} for an agent with ``limits`` (None = none).  ``own_uid``: the agent runs as a
    uid of its own (RLIMIT_NPROC counts per uid, so it is only meaningful then)."""
    rl: dict[str, int] = {"CORE": 0}
    if limits.get("memory_mb"):
        rl["AS"] = (limits["memory_mb"] + AS_HEADROOM_MB) * MB
    if limits.get("cpu_seconds"):
        rl["CPU"] = limits["cpu_seconds"] + 1  # the kernel's accounting kills first, with a reason
    if limits.get("open_files"):
        rl["NOFILE"] = limits["open_files"]
    if limits.get("disk_mb"):
        rl["FSIZE"] = limits["disk_mb"] * MB
    if limits.get("procs") and own_uid:
        rl["NPROC"] = limits["procs"]
    return rl


def available() -> str | None:
    return None  # every Linux process may lower its own limits


def apply(policy) -> str:
    """Set each rlimit of ``policy.rlimits`` (soft = hard, never above the current hard limit)."""
    done = []
    for name, value in policy.rlimits.items():
        which = RLIMITS[name]
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))
        done.append(f"{name}={value}")
    return " ".join(done)
