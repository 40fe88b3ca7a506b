"""cgroups for agents: the kernel creates one group per agent per controller; the agent joins it at boot.

Layout, per controller, under the kernel's own cgroup (so whatever limits the kernel itself lives under still
apply)::

    <kernel's cgroup>/aiosd-<kernel pid>/agent-<id>

cgroup v2 is used when the kernel's cgroup delegates the ``memory`` and ``pids`` controllers to its children
(``cgroup.subtree_control``); otherwise the v1 hierarchies ``/sys/fs/cgroup/{memory,pids,cpu}``.  Limits:
``memory.limit_in_bytes`` / ``memory.max`` = the agent's ``memory_mb`` (swap too, so it cannot page out),
``pids.max`` = ``procs`` (processes + threads: stops fork bombs, even for root), and a CPU quota of
``cpu_quota`` CPUs (default 1: an agent can never take more than one core, whatever it starts).

``join`` runs in the agent (first thing at boot, while it still may); everything else runs in the kernel.
"""
from __future__ import annotations

import errno
import os
import signal
import time
from sandbox.policy import LayerUnavailable

ROOT = "/sys/fs/cgroup"
V1_CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000
MB = 1 << 20


def join(procs_files: list[str]) -> str:
    """Write this process's pid into each ``cgroup.procs`` file (the agent's first act at boot)."""
    if not procs_files:
        raise LayerUnavailable("no cgroup for this agent (the kernel needs root and a memory/pids controller)")
    for path in procs_files:
        with open(path, "w") as f:
            f.write(str(os.getpid()))
    names = [p[len(ROOT) + 1:].split("/", 1)[0] if p.startswith(ROOT + "/") else "?" for p in procs_files]
    return f"{os.path.basename(os.path.dirname(procs_files[0]))} ({', '.join(names)})"


def _own_cgroups() -> dict[str, str]:
    """controller (or "" for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            for name in names.split(",") if names else [""]:
                out[name] = path
    return out


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value) -> None:
    with open(path, "w") as f:
        f.write(str(value))


class Layout:
    """Where this kernel's agent groups live: one parent dir per hierarchy."""

    def __init__(self, version: int, parents: dict[str, str]):
        self.version = version    # 1 or 2
        self.parents = parents    # controller ("memory", "pids", "cpu"; "unified" for v2) -> parent dir


def detect(kernel_pid: int) -> tuple[Layout | None, str]:
    """The layout this process can create, or (None, why not).  Creates nothing."""
    if os.geteuid() != 0:
        return None, "needs root (EACCES on /sys/fs/cgroup)"
    try:
        own = _own_cgroups()
    except OSError as exc:
        return None, f"cannot read /proc/self/cgroup: {exc.strerror}"
    name = f"aiosd-{kernel_pid}"
    # v2: a delegated subtree with memory and pids enabled for our children
    v2_path = own.get("")
    if v2_path is not None:
        for mnt in (ROOT, os.path.join(ROOT, "unified")):
            base = mnt + v2_path.rstrip("/")
            try:
                enabled = _read(os.path.join(base, "cgroup.subtree_control")).split()
            except OSError:
                continue
            if {"memory", "pids"} <= set(enabled) and os.access(base, os.W_OK):
                return Layout(2, {"unified": os.path.join(base, name)}), ""
    # v1: separate hierarchies per controller
    parents = {}
    for ctl in V1_CONTROLLERS:
        mnt = os.path.join(ROOT, ctl)
        base = mnt + own.get(ctl, "/").rstrip("/")
        if os.path.isfile(os.path.join(base, "cgroup.procs")) and os.access(base, os.W_OK):
            parents[ctl] = os.path.join(base, name)
    if "memory" in parents and "pids" in parents:
        return Layout(1, parents), ""
    return None, ("no usable controllers: cgroup v2 does not delegate memory+pids to this process's cgroup "
                  "and cgroup v1 memory/pids hierarchies are not mounted writable under /sys/fs/cgroup")


def create_parents(layout: Layout) -> None:
    for ctl, parent in layout.parents.items():
        os.makedirs(parent, exist_ok=True)
        if layout.version == 2:
            want = [c for c in ("memory", "pids", "cpu")
                    if c in _read(os.path.join(parent, "cgroup.controllers")).split()]
            _write(os.path.join(parent, "cgroup.subtree_control"), " ".join("+" + c for c in want))


def create_agent(layout: Layout, agent_id: int, limits: dict, cpu_quota: float | None) -> list[str]:
    """Create the agent's groups with its limits; return their ``cgroup.procs`` paths."""
    procs_files = []
    for ctl, parent in layout.parents.items():
        d = os.path.join(parent, f"agent-{agent_id}")
        os.makedirs(d, exist_ok=True)
        if layout.version == 2:
            _limit_v2(d, limits, cpu_quota)
        else:
            _limit_v1(ctl, d, limits, cpu_quota)
        procs_files.append(os.path.join(d, "cgroup.procs"))
    return procs_files


def _limit_v1(ctl: str, d: str, limits: dict, cpu_quota: float | None) -> None:
    if ctl == "memory" and limits.get("memory_mb"):
        value = limits["memory_mb"] * MB
        _write(os.path.join(d, "memory.limit_in_bytes"), value)
        _try_write(os.path.join(d, "memory.memsw.limit_in_bytes"), value)  # no swapping out of the limit
        _try_write(os.path.join(d, "memory.swappiness"), 0)
    elif ctl == "pids" and limits.get("procs"):
        _write(os.path.join(d, "pids.max"), limits["procs"])
    elif ctl == "cpu" and cpu_quota:
        _write(os.path.join(d, "cpu.cfs_period_us"), CPU_PERIOD_US)
        _write(os.path.join(d, "cpu.cfs_quota_us"), int(cpu_quota * CPU_PERIOD_US))


def _limit_v2(d: str, limits: dict, cpu_quota: float | None) -> None:
    if limits.get("memory_mb"):
        _write(os.path.join(d, "memory.max"), limits["memory_mb"] * MB)
        _try_write(os.path.join(d, "memory.swap.max"), 0)
    if limits.get("procs"):
        _write(os.path.join(d, "pids.max"), limits["procs"])
    if cpu_quota:
        _try_write(os.path.join(d, "cpu.max"), f"{int(cpu_quota * CPU_PERIOD_US)} {CPU_PERIOD_US}")


def _try_write(path: str, value) -> None:
    try:
        _write(path, value)
    except OSError:
        pass  # optional knob (no swap accounting, no cpu controller)


def agent_dirs(layout: Layout, agent_id: int) -> list[str]:
    return [os.path.join(parent, f"agent-{agent_id}") for parent in layout.parents.values()]


def pids_in(d: str) -> list[int]:
    try:
        return [int(x) for x in _read(os.path.join(d, "cgroup.procs")).split()]
    except OSError:
        return []


def kill_all(dirs: list[str], rounds: int = 50) -> int:
    """SIGKILL every process in ``dirs`` until no new one appears (a fork bomb converges: a process with
    SIGKILL pending cannot complete a fork).  Returns how many processes were signalled."""
    killed: set[int] = set()
    for _ in range(rounds):
        fresh = {pid for d in dirs for pid in pids_in(d)} - killed
        if not fresh:
            break
        for pid in fresh:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed |= fresh
    return len(killed)


def oom_kills(layout: Layout, agent_id: int) -> int:
    """How many processes the kernel's OOM killer took from the agent's memory group."""
    if layout.version == 2:
        path = os.path.join(layout.parents["unified"], f"agent-{agent_id}", "memory.events")
    elif "memory" in layout.parents:
        path = os.path.join(layout.parents["memory"], f"agent-{agent_id}", "memory.oom_control")
    else:
        return 0
    try:
        for line in _read(path).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def remove(dirs: list[str]) -> list[str]:
    """rmdir each group (children first); return those still busy (processes not yet gone) to retry later."""
    busy = []
    for d in dirs:
        for sub in sorted((os.path.join(d, e.name) for e in _subdirs(d)), reverse=True):
            busy += remove([sub])
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                raise
            busy.append(d)
    return busy


def _subdirs(d: str) -> list[os.DirEntry]:
    try:
        return [e for e in os.scandir(d) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def destroy(parents: list[str], timeout: float = 2.0) -> list[str]:
    """Kill everything under ``parents`` and remove the groups; return what could not be removed in time."""
    deadline = time.monotonic() + timeout
    while True:
        dirs = [d for p in parents for d in [p] + [s.path for s in _subdirs(p)]]
        kill_all(dirs)
        left = remove(list(parents))
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.02)


def remove_stale(layout: Layout) -> None:
    """Remove empty ``aiosd-<pid>`` groups left by kernels that died without cleaning up (pid gone)."""
    for parent in layout.parents.values():
        base = os.path.dirname(parent)
        for e in _subdirs(base):
            if not e.name.startswith("aiosd-") or e.path == parent:
                continue
            try:
                pid = int(e.name[6:])
            except ValueError:
                continue
            if not os.path.exists(f"/proc/{pid}"):
                try:
                    remove([e.path])
                except OSError:
                    pass
