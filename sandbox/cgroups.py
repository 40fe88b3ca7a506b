"""cgroups for agents: the kernel creates one group per agent; the agent joins it at boot.

Layout, under the kernel's own cgroup (so whatever limits the kernel itself lives under still apply)::

    v2: <delegated dir>/kernel                  the kernel (and its watchdog): a leaf
        <delegated dir>/aiosd-<kernel pid>/agent-<id>
    v1: /sys/fs/cgroup/{memory,pids,cpu}/<kernel's cgroup>/aiosd-<kernel pid>/agent-<id>

cgroup v2 needs a subtree delegated to the kernel -- root is not required: the kernel's own cgroup when
systemd delegated it (``Delegate=yes``: the ``trusted.delegate``/``user.delegate`` attribute), when the
kernel's user owns it (a user service, ``chown``), when it already enables ``memory`` and ``pids`` for its
children (the root of a container's cgroup namespace), or the directory ``[sandbox] cgroup_dir`` names.  A
cgroup with processes cannot enable controllers for its children ("no internal processes"), so the kernel
first moves every process of that directory into the leaf ``kernel``, then enables ``memory pids cpu`` in its
``cgroup.subtree_control``.  Without such a subtree, a root kernel uses the v1 hierarchies; otherwise the
layer is off, with the reason.

Limits: ``memory.max`` (v1 ``memory.limit_in_bytes``) = the agent's ``memory_mb``, swap too, so it cannot page
out; ``memory.oom.group`` = 1 (an OOM kill takes the agent's whole tree, not one process of it);
``pids.max`` = ``procs`` (processes + threads: stops fork bombs, even for root); ``cpu.max`` (v1
``cpu.cfs_quota_us``) = ``cpu_quota`` CPUs (default 1: an agent never takes more than one core, whatever it
starts).  Killing writes ``cgroup.kill`` (v2, Linux >= 5.14: every process at once, no race with a fork) and
else SIGKILLs the members until none is left.

The layer's entry points (``sandbox.layer``): ``available``, ``apply`` (the agent joins its groups, first
thing at boot, while it still may).  Everything else runs in the kernel.
"""
from __future__ import annotations

import errno
import os
import signal
import time

from sandbox.layer import LayerUnavailable

ROOT = "/sys/fs/cgroup"
V1_CONTROLLERS = ("memory", "pids", "cpu")
V2_CONTROLLERS = ("memory", "pids", "cpu")  # memory and pids required, cpu where the parent has it
REQUIRED = ("memory", "pids")
KERNEL_LEAF = "kernel"
DELEGATE_XATTRS = ("trusted.delegate", "user.delegate")  # systemd >= 251 marks delegated cgroups
CPU_PERIOD_US = 100_000
MB = 1 << 20


def available() -> str | None:
    return None if os.path.isdir(ROOT) else f"no cgroup filesystem at {ROOT}"


def apply(policy) -> str:
    return join(policy.cgroup_procs)


def join(procs_files: list[str]) -> str:
    """Write this process's pid into each ``cgroup.procs`` file (the agent's first act at boot)."""
    if not procs_files:
        raise LayerUnavailable("no cgroup for this agent (the kernel needs a delegated cgroup v2 subtree, or "
                               "root and the v1 memory/pids controllers)")
    for path in procs_files:
        _write(path, os.getpid())
    d = os.path.dirname(procs_files[0])
    try:
        names = ["v2"] + _read(os.path.join(d, "cgroup.controllers")).split()
    except OSError:
        names = [p[len(ROOT) + 1:].split("/", 1)[0] if p.startswith(ROOT + "/") else "?" for p in procs_files]
    return f"{os.path.basename(d)} ({', '.join(names)})"


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
    """Write an existing control file (never creates one: a missing knob is an OSError)."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


class Layout:
    """Where this kernel's agent groups live: one parent dir per hierarchy."""

    def __init__(self, version: int, parents: dict[str, str], base: str | None = None):
        self.version = version    # 1 or 2
        self.parents = parents    # controller ("memory", "pids", "cpu"; "unified" for v2) -> parent dir
        self.base = base          # v2: the delegated directory holding the kernel's leaf and the parent
        self.controllers: list[str] = list(V1_CONTROLLERS) if version == 1 else []  # v2: once enabled


def delegation(base: str, explicit: bool = False) -> str | None:
    """None when the cgroup v2 directory ``base`` is this kernel's to divide, else why not.  ``explicit``: an
    operator named it (``[sandbox] cgroup_dir``), which counts as delegating it."""
    try:
        have = _read(os.path.join(base, "cgroup.controllers")).split()
    except OSError:
        return f"{base} is not a cgroup v2 directory (no cgroup.controllers)"
    missing = [c for c in REQUIRED if c not in have]
    if missing:
        return f"{base} lacks the {' and '.join(missing)} controller (its parent does not enable it)"
    if not all(os.access(os.path.join(base, f), os.W_OK) for f in ("", "cgroup.procs", "cgroup.subtree_control")):
        return (f"{base} is not writable by uid {os.geteuid()} (delegate it: systemd Delegate=yes, or chown it "
                "and its cgroup.procs and cgroup.subtree_control to the kernel's user)")
    if explicit or _delegated(base):
        return None
    return (f"{base} is not delegated to this kernel (run it as a systemd service with Delegate=yes, or name a "
            "cgroup v2 directory it owns in [sandbox] cgroup_dir)")


def _delegated(base: str) -> bool:
    """Whether ``base`` was given to this process to divide: marked by systemd, owned by this (non-root)
    user, or already enabling the required controllers for its children (a cgroup namespace's root)."""
    for name in DELEGATE_XATTRS:
        try:
            if os.getxattr(base, name) == b"1":
                return True
        except OSError:
            pass
    if os.geteuid() != 0 and os.stat(base).st_uid == os.geteuid():
        return True
    try:
        return set(REQUIRED) <= set(_read(os.path.join(base, "cgroup.subtree_control")).split())
    except OSError:
        return False


def detect(kernel_pid: int, cgroup_dir: str | None = None) -> tuple[Layout | None, str]:
    """The layout this process can create, or (None, why not).  Creates nothing.  ``cgroup_dir``: a cgroup v2
    directory to use instead of looking (``[sandbox] cgroup_dir``)."""
    name = f"aiosd-{kernel_pid}"
    if cgroup_dir:
        why = delegation(cgroup_dir, explicit=True)
        if why:
            return None, f"[sandbox] cgroup_dir: {why}"
        return Layout(2, {"unified": os.path.join(cgroup_dir, name)}, cgroup_dir), ""
    try:
        own = _own_cgroups()
    except OSError as exc:
        return None, f"cannot read /proc/self/cgroup: {exc.strerror}"
    v2_why = "cgroup v2 is not mounted"
    if "" in own:
        for mnt in (ROOT, os.path.join(ROOT, "unified")):
            base = mnt + own[""].rstrip("/")
            if os.path.isfile(os.path.join(base, "cgroup.controllers")):
                v2_why = delegation(base)
                if v2_why is None:
                    return Layout(2, {"unified": os.path.join(base, name)}, base), ""
                break
    if os.geteuid() != 0:
        return None, f"{v2_why}; cgroup v1 needs root"
    parents = {}
    for ctl in V1_CONTROLLERS:
        base = os.path.join(ROOT, ctl) + own.get(ctl, "/").rstrip("/")
        if os.path.isfile(os.path.join(base, "cgroup.procs")) and os.access(base, os.W_OK):
            parents[ctl] = os.path.join(base, name)
    if "memory" in parents and "pids" in parents:
        return Layout(1, parents), ""
    return None, f"{v2_why}; and cgroup v1 memory/pids hierarchies are not mounted writable under {ROOT}"


def create_parents(layout: Layout) -> None:
    """Make the kernel's parent groups; on v2, enable the controllers for them (moving the kernel into its
    leaf first when its directory holds processes)."""
    if layout.version == 1:
        for parent in layout.parents.values():
            os.makedirs(parent, exist_ok=True)
        return
    base = layout.base
    have = _read(os.path.join(base, "cgroup.controllers")).split()
    want = [c for c in V2_CONTROLLERS if c in have]
    layout.controllers = _enable(base, want)
    parent = layout.parents["unified"]
    os.makedirs(parent, exist_ok=True)
    layout.controllers = _enable(parent, layout.controllers)


def _enable(d: str, want: list[str]) -> list[str]:
    """Enable ``want`` for the children of ``d``; returns those enabled (the required ones or OSError).  A
    directory with processes refuses (EBUSY): they move into its leaf ``kernel`` first."""
    enabled = _read(os.path.join(d, "cgroup.subtree_control")).split()
    for ctl in want:
        if ctl in enabled:
            continue
        try:
            try:
                _write(os.path.join(d, "cgroup.subtree_control"), f"+{ctl}")
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                move_to_leaf(d)
                _write(os.path.join(d, "cgroup.subtree_control"), f"+{ctl}")
            enabled.append(ctl)
        except OSError:
            if ctl in REQUIRED:
                raise
    return [c for c in want if c in enabled]


def move_to_leaf(d: str) -> str:
    """Move every process of ``d`` into ``d/kernel`` (made if need be); returns the leaf."""
    leaf = os.path.join(d, KERNEL_LEAF)
    os.makedirs(leaf, exist_ok=True)
    for pid in pids_in(d):
        try:
            _write(os.path.join(leaf, "cgroup.procs"), pid)
        except ProcessLookupError:
            pass  # gone meanwhile
    return leaf


def create_agent(layout: Layout, agent_id: int, limits: dict, cpu_quota: float | None) -> list[str]:
    """Create the agent's groups with its limits; return their ``cgroup.procs`` paths."""
    procs_files = []
    for ctl, parent in layout.parents.items():
        d = os.path.join(parent, f"agent-{agent_id}")
        os.makedirs(d, exist_ok=True)
        if layout.version == 2:
            _limit_v2(d, limits, cpu_quota if "cpu" in layout.controllers else None)
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
        _try_write(os.path.join(d, "memory.swap.max"), 0)  # no swap accounting: nothing to bound
    _try_write(os.path.join(d, "memory.oom.group"), 1)  # Linux >= 4.19
    if limits.get("procs"):
        _write(os.path.join(d, "pids.max"), limits["procs"])
    if cpu_quota:
        _write(os.path.join(d, "cpu.max"), f"{int(cpu_quota * CPU_PERIOD_US)} {CPU_PERIOD_US}")


def _try_write(path: str, value) -> None:
    try:
        _write(path, value)
    except OSError:
        pass  # optional knob (no swap accounting, an older kernel)


def agent_dirs(layout: Layout, agent_id: int) -> list[str]:
    return [os.path.join(parent, f"agent-{agent_id}") for parent in layout.parents.values()]


def pids_in(d: str) -> list[int]:
    try:
        return [int(x) for x in _read(os.path.join(d, "cgroup.procs")).split()]
    except OSError:
        return []


def kill(dirs: list[str]) -> int:
    """SIGKILL every process in ``dirs``: through ``cgroup.kill`` where the kernel has it (v2, Linux >= 5.14),
    else member by member (``kill_all``).  Returns how many processes were signalled one by one."""
    rest = []
    for d in dirs:
        try:
            _write(os.path.join(d, "cgroup.kill"), 1)
        except OSError:  # v1, an older kernel, or the group is gone
            rest.append(d)
    return kill_all(rest)


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
        kill(dirs)
        left = remove(list(parents))
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.02)


def remove_stale(layout: Layout) -> None:
    """Remove empty ``aiosd-<pid>`` groups left by kernels that died without cleaning up (pid gone)."""
    for parent in layout.parents.values():
        base = os.path.dirname(parent)
        for e in _subdirs(base):
            if not e.name.startswith("aiosd-") or e.path == parent:  # (and the kernel's leaf)
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
