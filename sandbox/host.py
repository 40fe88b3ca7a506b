"""The kernel's side of the sandbox: what must be prepared outside the agent before it starts, and undone after.

``Host.prepare`` builds an agent's ``Policy``: its cgroups (created here, joined by the agent), its uid from
the pool, the paths it may read and write, and the reasons for every layer the kernel cannot give it.
``Host.kill`` kills everything the agent started, including processes that left its process group or
session (through its cgroups); ``Host.release`` undoes ``prepare`` once the agent is reaped;
``Host.kill_orphans`` kills what agents left behind re-parented to the kernel; ``Host.close`` removes the
kernel's cgroups at shutdown.  A root kernel gives each agent with a ``disk_mb`` limit a tmpfs of its own on
its scratch directory (``sandbox.scratchfs``); ``release`` hands the mount point back to the caller to detach
off the event loop (``scratchfs.unmount``), and ``remove_stale_mounts`` detaches what a killed kernel left.
``Host.capabilities`` says which layers this machine and user can have, and why not, for operators.

While the kernel has cgroups, a watchdog process (``sandbox.watchdog``) holds a pipe from the kernel: if the
kernel dies without ``close()`` -- SIGKILL, a crash -- it kills everything left in the kernel's cgroups and
removes them, so no agent descendant outlives its kernel.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sandbox import cgroups, identity, landlock, namespaces, paths, scratchfs, seccomp
from sandbox import policy as policy_mod
from syscalls.address import SOCKET_NAME

log = logging.getLogger("aiosd.sandbox")

DEFAULT_UID_BASE = 200_000
DEFAULT_UID_COUNT = 1000
DEFAULT_CPU_QUOTA = 1.0     # CPUs per agent (cgroup CPU quota)
INODE_SLACK = 2             # the scratch tmpfs's root, and one inode over the limit so the kernel sees the breach


class SandboxError(RuntimeError):
    """The sandbox configuration is unsafe (e.g. an agent-readable path contains the model); says which."""


@dataclass
class _Agent:
    limits: dict
    uid: int | None = None
    cgroup_dirs: list[str] = field(default_factory=list)
    scratch_mount: str | None = None  # its scratch dir, when a tmpfs is mounted there


class Host:
    def __init__(self, runtime_dir: Path, protected: list[str], *, uid_base: int = DEFAULT_UID_BASE,
                 uid_count: int = DEFAULT_UID_COUNT, cpu_quota: float | None = DEFAULT_CPU_QUOTA,
                 extra_read: list[str] = (), use_uids: bool = True, use_cgroups: bool = True,
                 use_tmpfs: bool = True, cgroup_dir: str | None = None):
        """``protected``: paths agents must never reach (model files, the state dir).  ``uid_base``,
        ``uid_count``: the pool of agent uids (and gids) for a root kernel.  ``cpu_quota``: CPUs per agent
        (None: no quota).  ``extra_read``: more read-only paths for agents (e.g. a data set).  ``use_tmpfs``:
        a tmpfs per agent on its scratch dir, where this process may mount one.  ``cgroup_dir``: a cgroup v2
        directory delegated to the kernel, instead of looking for one (sandbox.cgroups)."""
        self.runtime_dir = Path(runtime_dir)
        self.protected = [os.path.realpath(p) for p in protected]
        self.root = os.geteuid() == 0
        self.pid = os.getpid()
        self.cpu_quota = cpu_quota
        read, listed = paths.default_read_paths()
        self.read = list(read) + [os.path.realpath(p) for p in extra_read]
        self.listed = list(listed)
        self.check_paths(self.read + self.listed)
        self._agents: dict[int, _Agent] = {}
        self._busy_dirs: list[str] = []
        self._watchdog: subprocess.Popen | None = None
        self._parents_made = False
        # uids
        self.uid_base, self.uid_count = uid_base, uid_count
        if not use_uids:
            self.uid_off = "disabled by configuration"
        elif not self.root:
            self.uid_off = "needs root (the kernel is not running as root)"
        else:
            blocker = identity.switch_blocker(paths.interpreter_paths())
            self.uid_off = f"another uid cannot run the interpreter: {blocker}" if blocker else None
        self._uids_free = set() if self.uid_off else set(range(uid_base, uid_base + uid_count))
        # cgroups
        if use_cgroups:
            self.layout, self.cgroup_off = cgroups.detect(self.pid, cgroup_dir)
        else:
            self.layout, self.cgroup_off = None, "disabled by configuration"
        # scratch filesystems: probed (one trial mount) when first needed, once the runtime dir exists
        self._tmpfs_off: str | None = None if use_tmpfs else "disabled by configuration"
        self._tmpfs_probed = not use_tmpfs
        self._capabilities: dict[str, str] | None = None

    # --- operators -----------------------------------------------------------------------------------
    def capabilities(self) -> dict[str, str]:
        """{layer: "available[: detail]" | "unavailable: reason"} for this machine and this kernel's user."""
        if self._capabilities is None:
            def state(reason: str | None, detail: str = "") -> str:
                return f"unavailable: {reason}" if reason else "available" + (f": {detail}" if detail else "")
            abi = landlock.abi_version()
            ns_reason = namespaces.available()
            self._capabilities = {
                "cgroup": state(self.cgroup_off, self.layout and f"cgroup v{self.layout.version}"),
                "netns": state(ns_reason, "net, ipc" if self.root else "user, net, ipc"),
                "rlimits": state(None),
                "landlock": state(landlock.available(abi), f"ABI {abi}"),
                "caps": state(None, "root agents drop every capability" if self.root and self.uid_off
                              else "nothing to drop" if not self.root else "the uid switch drops them"),
                "uid": state(self.uid_off, f"pool {self.uid_base}..{self.uid_base + self.uid_count - 1}"),
                "prctl": state(None),
                "seccomp": state(seccomp.available()),
                "disk": state(self.tmpfs_off(), "tmpfs per agent with a disk_mb limit"),
            }
        return dict(self._capabilities)

    def tmpfs_off(self) -> str | None:
        """None when agents get a tmpfs of their own on their scratch dir, else why not (probed once)."""
        if not self._tmpfs_probed:
            self._tmpfs_probed = True
            probe = self.runtime_dir if self.runtime_dir.is_dir() else Path(tempfile.gettempdir())
            reason = scratchfs.unavailable_reason(str(probe))
            self._tmpfs_off = (f"{reason}; disk usage is measured by walking scratch off the event loop"
                               if reason else None)
        return self._tmpfs_off

    def scratch_mounted(self, agent_id: int) -> bool:
        """Whether the agent's scratch dir is a tmpfs of its own (its usage is then one ``statvfs``)."""
        agent = self._agents.get(agent_id)
        return bool(agent and agent.scratch_mount)

    def remove_stale_mounts(self) -> list[str]:
        """Detach scratch mounts a previous kernel on this runtime dir left behind (it was killed before it
        could); returns them.  Call before removing old scratch dirs."""
        left = scratchfs.mounts_under(str(self.runtime_dir / "scratch"))
        for path in left:
            _unmount_quietly(path)
        return left

    def check_paths(self, readable: list[str], writable: list[str] = ()) -> None:
        """Refuse an agent-readable path that contains, or lies inside, a protected path, and an agent-writable
        one that contains a protected path (a scratch dir inside a protected dir exposes nothing else)."""
        for path, inside_too in [(p, True) for p in readable] + [(p, False) for p in writable]:
            real = os.path.realpath(path)
            for prot in self.protected:
                if _within(real, prot) or (inside_too and _within(prot, real)):
                    raise SandboxError(f"agents would reach the protected path {prot} through {path}")

    # --- agent life cycle ----------------------------------------------------------------------------
    def prepare(self, agent_id: int, scratch: Path, limits: dict, *, allow_fork: bool = False,
                allow_connect: bool | None = None, allow_exec: bool = False, network: bool = False,
                read_only: bool = False, read_extra: tuple[str, ...] = (),
                list_extra: tuple[str, ...] = (), packages: tuple[str, ...] = ()) -> policy_mod.Policy:
        """The agent's policy; creates its cgroups and allocates its uid (released by ``release``).
        ``allow_connect`` (new connections after boot; see sandbox.seccomp) defaults to ``allow_fork``.
        ``allow_exec``, ``network``, ``read_only`` (not even the scratch dir is writable), ``read_extra``
        (more paths to read and run) and ``list_extra`` (directories to list) are the kernel's own, for the MCP servers an operator configures; agents
        never get them.  ``packages``: site-packages directories an operator chose for the agent (a venv): readable
        and on its ``sys.path``, nothing else."""
        try:
            return self._prepare(agent_id, scratch, limits, allow_fork, allow_connect,
                                 dict(allow_exec=allow_exec, network=network, read_only=read_only,
                                      read_extra=tuple(read_extra), list_extra=tuple(list_extra),
                                      packages=tuple(packages)))
        except BaseException:
            mount = self.release(agent_id)
            if mount:
                _unmount_quietly(mount)
            raise

    def _prepare(self, agent_id: int, scratch: Path, limits: dict, allow_fork: bool,
                 allow_connect: bool | None, extra: dict) -> policy_mod.Policy:
        agent = self._agents[agent_id] = _Agent(dict(limits))
        off: dict[str, str] = {}
        procs_files: list[str] = []
        if self.layout is None:
            off["cgroup"] = self.cgroup_off
        else:
            try:
                self._ensure_parents()
                agent.cgroup_dirs = cgroups.agent_dirs(self.layout, agent_id)
                procs_files = cgroups.create_agent(self.layout, agent_id, limits, self.cpu_quota)
            except OSError as exc:
                log.warning("agent %d: no cgroup: %s", agent_id, exc)
                off["cgroup"] = f"the kernel could not create it: {exc.strerror or exc}"
                procs_files = []  # (what was made is removed by release)
        if limits.get("disk_mb") and self.tmpfs_off() is None:
            disk_mb, inodes = limits["disk_mb"], limits.get("disk_inodes")
            try:  # before the chown below, which then applies to the tmpfs's root
                scratchfs.mount(str(scratch), disk_mb + max(1, disk_mb // 16),
                                inodes + INODE_SLACK if inodes else None)
                agent.scratch_mount = str(scratch)
            except OSError as exc:
                log.warning("agent %d: no tmpfs on its scratch dir: %s", agent_id, exc.strerror or exc)
        gid = None
        if self.uid_off:
            off["uid"] = self.uid_off
        else:
            if not self._uids_free:
                from syscalls.errors import EAGAIN
                raise EAGAIN(f"the agent uid pool ({self.uid_count} uids) is exhausted; wait or kill an agent")
            agent.uid = gid = min(self._uids_free)
            self._uids_free.discard(agent.uid)
            _chown_tree(scratch, agent.uid, gid)
            # an agent of another uid must be able to pass through to its scratch (absolute paths, TMPDIR):
            # search but not list; its own scratch stays 0700, the socket needs write permission it lacks
            for d in (self.runtime_dir, scratch.parent):
                os.chmod(d, 0o711)
        pol = policy_mod.build(str(scratch), limits, uid=agent.uid, gid=gid,
                               cgroup_procs=procs_files, allow_fork=allow_fork,
                               allow_connect=allow_connect,
                               read=[*self.read, *extra["read_extra"], *extra["packages"]],
                               listed=[*self.listed, *extra["list_extra"]],
                               unix_sockets=[str(self.runtime_dir / SOCKET_NAME)], off=off,
                               allow_exec=extra["allow_exec"], network=extra["network"],
                               read_only=extra["read_only"])
        pol.sys_path = list(extra["packages"])
        self.check_paths(pol.landlock_read + pol.landlock_list, pol.landlock_write)
        return pol

    def kill(self, agent_id: int, pid: int) -> None:
        """SIGKILL the agent's process group and every process in its cgroups (also those that left the
        group or the session: double forks, ``setsid``)."""
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        agent = self._agents.get(agent_id)
        if agent and agent.cgroup_dirs:
            cgroups.kill(agent.cgroup_dirs)

    def death_reason(self, agent_id: int) -> str | None:
        """Why the agent died when the kernel did not kill it itself: the cgroup OOM killer, or None."""
        agent = self._agents.get(agent_id)
        if agent and self.layout and cgroups.oom_kills(self.layout, agent_id):
            return f"OOMKilled: cgroup memory limit {agent.limits.get('memory_mb')} MB"
        return None

    def release(self, agent_id: int) -> str | None:
        """Undo ``prepare`` once the agent has been reaped: kill leftovers, remove its cgroups, free its uid.
        Groups still busy (their last processes not yet gone) are retried on every later call.  Returns the
        agent's scratch mount point, if it has one, for the caller to ``scratchfs.unmount`` -- freeing a tmpfs
        of many files takes tens of milliseconds, so the kernel does it off its event loop."""
        agent = self._agents.pop(agent_id, None)
        if agent is not None and agent.cgroup_dirs:
            cgroups.kill(agent.cgroup_dirs)
            self._busy_dirs += cgroups.remove(agent.cgroup_dirs)
        self._retry_busy()  # groups of earlier agents whose last processes had not yet gone
        if agent is not None and agent.uid is not None:
            self._uids_free.add(agent.uid)
        return agent.scratch_mount if agent is not None else None

    def kill_orphans(self, known_pids: set[int]) -> list[int]:
        """SIGKILL every direct child of the kernel that is not in ``known_pids`` (live agents) -- orphans
        agents left behind, re-parented to the kernel (a child subreaper) -- except the watchdog and, with
        cgroups, processes still inside a live agent's cgroup (accounted and killed with that agent).
        Returns the pids killed.  Scans /proc: call it about once a second."""
        exempt = set(known_pids)
        if self._watchdog is not None:
            exempt.add(self._watchdog.pid)
        killed = []
        for pid in _children_of(self.pid):
            if pid in exempt or self._in_live_cgroup(pid):
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        self._retry_busy()
        return killed

    def close(self) -> None:
        """Kernel shutdown: kill whatever is left in the kernel's cgroups and remove them; stop the watchdog."""
        if self.layout is not None and self._parents_made:
            left = cgroups.destroy(list(self.layout.parents.values()))
            if left:
                log.warning("could not remove cgroups %s (the watchdog retries)", left)
            self._parents_made = False
        if self._watchdog is not None:
            try:
                self._watchdog.stdin.close()  # EOF: the watchdog finds nothing left and exits
                self._watchdog.wait(5)
            except (OSError, subprocess.TimeoutExpired, ChildProcessError):
                pass
            self._watchdog = None

    # --- internals -----------------------------------------------------------------------------------
    def _ensure_parents(self) -> None:
        if self._parents_made:
            return
        cgroups.remove_stale(self.layout)
        cgroups.create_parents(self.layout)
        self._parents_made = True
        if self._watchdog is None:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-I", "-m", "sandbox.watchdog", "--scratch", str(self.runtime_dir / "scratch"),
                 *self.layout.parents.values()],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, close_fds=True, start_new_session=True)

    def _in_live_cgroup(self, pid: int) -> bool:
        if self.layout is None:
            return False
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                text = f.read()
        except OSError:
            return False
        marker = f"/aiosd-{self.pid}/agent-"
        for line in text.splitlines():
            _, _, path = line.partition(":")[2].partition(":")
            if marker in path:
                try:
                    return int(path.rsplit("agent-", 1)[1].split("/")[0]) in self._agents
                except ValueError:
                    return False
        return False

    def _retry_busy(self) -> None:
        if self._busy_dirs:
            self._busy_dirs = cgroups.remove(self._busy_dirs)


def _unmount_quietly(path: str) -> None:
    try:
        scratchfs.unmount(path)
    except OSError as exc:
        log.warning("cannot detach the scratch mount %s: %s", path, exc.strerror or exc)


def _within(parent: str, path: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _children_of(ppid: int) -> list[int]:
    """Live (non-zombie) processes whose parent is ``ppid`` (scans /proc)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split(None, 2)
        if int(fields[1]) == ppid and fields[0] != b"Z":
            out.append(int(name))
    return out


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)
