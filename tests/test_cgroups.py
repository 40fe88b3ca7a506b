"""cgroup v2 with a delegated subtree (sandbox/cgroups.py, docs/sandbox.md "cgroups"), against a temporary
directory tree that mimics cgroupfs: this machine has only cgroup v1 (whose real path tests/test_sandbox.py
covers), so the v2 path is checked here without root and without a v2 mount.

``FakeCgroupfs`` gives the tree what the kernel would: ``mkdir`` makes the interface files (a child's
``cgroup.controllers`` is its parent's ``cgroup.subtree_control``), a process lives in exactly one
``cgroup.procs``, enabling a controller for the children of a cgroup that holds processes fails with EBUSY
("no internal processes"), ``cgroup.kill`` empties the subtree and ``rmdir`` refuses a populated group.
"""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from sandbox import cgroups
from sandbox.host import Host
from tests.conftest import STATE_DIR

MB = 1 << 20
INTERFACE = {"cgroup.procs": "", "cgroup.subtree_control": "", "cgroup.kill": "", "cgroup.events": "populated 0\n",
             "memory.max": "max\n", "memory.swap.max": "max\n", "memory.oom.group": "0\n",
             "memory.events": "oom_kill 0\n", "pids.max": "max\n", "cpu.max": "max 100000\n"}


class FakeCgroupfs:
    """A cgroup v2 mount imitated under ``root`` (see the module docstring); ``base``: a cgroup holding this
    test process, with memory, pids and cpu available."""

    def __init__(self, root: Path, monkeypatch):
        self.root = str(root)
        self._mkdir, self._rmdir, self._write = os.mkdir, os.rmdir, cgroups._write
        monkeypatch.setattr(os, "mkdir", self.mkdir)
        monkeypatch.setattr(os, "rmdir", self.rmdir)
        monkeypatch.setattr(cgroups, "_write", self.write)
        self.base = root / "aiosd.service"
        self._mkdir(self.base)
        for name, text in {**INTERFACE, "cgroup.controllers": "cpu memory pids\n",
                           "cgroup.procs": f"{os.getpid()}\n"}.items():
            (self.base / name).write_text(text)

    def _ours(self, path) -> bool:
        return str(path).startswith(self.root + "/")

    def mkdir(self, path, mode=0o777, **kw):
        self._mkdir(path, mode, **kw)
        if self._ours(path):
            parent = os.path.dirname(path)
            for name, text in {**INTERFACE, "cgroup.controllers": self.read(parent, "cgroup.subtree_control")}.items():
                Path(path, name).write_text(text)

    def rmdir(self, path, **kw):
        if not self._ours(path):
            return self._rmdir(path, **kw)
        if self.read(path, "cgroup.procs").split() or any(e.is_dir() for e in os.scandir(path)):
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        for e in os.scandir(path):
            os.unlink(e.path)
        self._rmdir(path)

    def read(self, d, name) -> str:
        return Path(d, name).read_text()

    def write(self, path, value):
        if not self._ours(path):
            return self._write(path, value)
        d, name, text = os.path.dirname(path), os.path.basename(path), str(value)
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, "No such file", path)
        if name == "cgroup.subtree_control":
            enabled = self.read(d, name).split()
            for token in text.split():
                if token[1:] not in self.read(d, "cgroup.controllers").split():
                    raise OSError(errno.ENOENT, "not available", path)
                if self.read(d, "cgroup.procs").split():
                    raise OSError(errno.EBUSY, "internal processes", path)
                enabled = sorted(set(enabled) | {token[1:]}) if token[0] == "+" else \
                    [c for c in enabled if c != token[1:]]
            Path(path).write_text(" ".join(enabled))
        elif name == "cgroup.procs":
            for procs in Path(self.root).rglob("cgroup.procs"):
                procs.write_text("".join(f"{p}\n" for p in procs.read_text().split() if p != text))
            Path(path).write_text(self.read(d, name) + f"{text}\n")
        elif name == "cgroup.kill":
            for procs in Path(d).rglob("cgroup.procs"):
                procs.write_text("")
            Path(path).write_text(text)
        else:
            Path(path).write_text(text)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    (tmp_path / "cgroupfs").mkdir()
    return FakeCgroupfs(tmp_path / "cgroupfs", monkeypatch)


def test_a_delegated_v2_subtree_gives_each_agent_its_limits_without_root(tmp_path, fake):
    base = fake.base
    host = Host(tmp_path / "run", [str(STATE_DIR)], cgroup_dir=str(base), use_uids=False, use_tmpfs=False)
    assert host.capabilities()["cgroup"] == "available: cgroup v2"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        policy = host.prepare(7, scratch, {"memory_mb": 256, "procs": 32})
        # the kernel left the delegated cgroup for its leaf, then enabled the controllers there and below
        assert fake.read(base, "cgroup.procs") == "" and str(os.getpid()) in fake.read(base / "kernel", "cgroup.procs")
        assert fake.read(base, "cgroup.subtree_control").split() == ["cpu", "memory", "pids"]
        parent = base / f"aiosd-{os.getpid()}"
        assert fake.read(parent, "cgroup.subtree_control").split() == ["cpu", "memory", "pids"]
        agent = parent / "agent-7"
        assert policy.cgroup_procs == [str(agent / "cgroup.procs")] and "cgroup" not in policy.off
        assert fake.read(agent, "memory.max") == str(256 * MB) and fake.read(agent, "memory.swap.max") == "0"
        assert fake.read(agent, "memory.oom.group") == "1" and fake.read(agent, "pids.max") == "32"
        assert fake.read(agent, "cpu.max") == "100000 100000"  # [sandbox] cpu_quota = 1.0
        # the agent's first act at boot: join its group (here the sleeper stands in for it)
        fake.write(str(agent / "cgroup.procs"), sleeper.pid)
        assert cgroups.pids_in(str(agent)) == [sleeper.pid]
        host.kill(7, sleeper.pid)  # its process group, then the whole cgroup at once
        assert fake.read(agent, "cgroup.kill") == "1" and cgroups.pids_in(str(agent)) == []
        assert sleeper.wait(10) == -9
        assert host.release(7) is None and not agent.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
        host.close()
    assert not (base / f"aiosd-{os.getpid()}").exists() and (base / "kernel").is_dir()


def test_the_agent_joins_its_v2_group_and_reports_its_controllers(tmp_path, fake):
    host = Host(tmp_path / "run", [str(STATE_DIR)], cgroup_dir=str(fake.base), use_uids=False, use_tmpfs=False)
    (tmp_path / "scratch").mkdir()
    try:
        policy = host.prepare(3, tmp_path / "scratch", {"procs": 8})
        assert cgroups.apply(policy) == "agent-3 (v2, cpu, memory, pids)"
        assert cgroups.pids_in(str(fake.base / f"aiosd-{os.getpid()}" / "agent-3")) == [os.getpid()]
        fake.write(str(fake.base / "kernel" / "cgroup.procs"), os.getpid())  # back, so the group can go
        host.release(3)
    finally:
        host.close()


def test_a_v2_cgroup_is_used_only_when_delegated(tmp_path, fake):
    base = str(fake.base)
    # root in someone else's cgroup (a login session's scope) must not rearrange systemd's tree
    assert "not delegated to this kernel" in cgroups.delegation(base)
    assert cgroups.delegation(base, explicit=True) is None      # [sandbox] cgroup_dir names it
    if not _xattrs(base):
        pytest.skip("no user xattrs on this filesystem")
    os.setxattr(base, "user.delegate", b"1")
    assert cgroups.delegation(base) is None                      # systemd's Delegate=yes mark


def test_a_cgroup_dir_that_cannot_be_used_says_why(tmp_path, fake):
    (fake.base / "cgroup.controllers").write_text("cpu\n")
    layout, why = cgroups.detect(os.getpid(), str(fake.base))
    assert layout is None and why.startswith("[sandbox] cgroup_dir: ") and "lacks the memory and pids" in why
    layout, why = cgroups.detect(os.getpid(), str(tmp_path))
    assert layout is None and "not a cgroup v2 directory" in why
    host = Host(tmp_path / "run", [str(STATE_DIR)], cgroup_dir=str(tmp_path), use_uids=False, use_tmpfs=False)
    assert host.capabilities()["cgroup"].startswith("unavailable: [sandbox] cgroup_dir")


def _xattrs(path: str) -> bool:
    try:
        os.setxattr(path, "user.aiosd-probe", b"1")
        return True
    except OSError:
        return False
