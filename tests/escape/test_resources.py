"""Escapes by exhaustion: processes, memory, CPU, disk, descriptors, syscalls.  Each is bounded twice -- by
the limits given at spawn and by the test's own deadline -- so a failed defence cannot take the machine down."""
from __future__ import annotations

import time

import pytest

from tests.escape.conftest import attack, force_gone, kill, need, spawn, wait_output

pytestmark = pytest.mark.timeout(90)


def _cgroup_pids_dir(pid: int) -> str | None:
    """The v1 pids cgroup (or v2 group) of a live process, read from the test's side."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, ctl, path = line.split(":", 2)
        if ctl == "pids":
            return "/sys/fs/cgroup/pids" + path
    return None


def test_fork_bomb_is_contained_by_the_pids_cgroup(kernel, layers, neighbour):
    """A group that may fork, a bomb in which every process forks for 3 s; ``procs`` 16 holds it."""
    need(layers, "cgroup")
    rec = spawn(kernel, """
        import time
        deadline = time.monotonic() + 3
        made = failed = 0
        me = os.getpid()
        while time.monotonic() < deadline:
            try:
                if os.fork() == 0:
                    continue          # the child bombs too
                made += 1
            except BlockingIOError:   # EAGAIN: pids.max reached
                failed += 1
                time.sleep(0.005)
        if os.getpid() != me:
            os._exit(0)
        print("bomb made", made, "failed", failed, flush=True)
        time.sleep(60)
    """, group="trusted", limits={"procs": 16, "memory_mb": 512, "cpu_seconds": 60, "wall_seconds": 60})
    pid_, pid = rec["id"], rec["pid"]
    try:
        pids_dir = None
        deadline = time.monotonic() + 10
        while "/agent-" not in (pids_dir or "") and time.monotonic() < deadline:
            pids_dir = _cgroup_pids_dir(pid)  # once the bootstrap has joined its group
            time.sleep(0.02)
        assert pids_dir and "/agent-" in pids_dir, pids_dir
        out = wait_output(kernel, pid_, "bomb made", timeout=30)
        failed = int(out.split("failed")[1].split()[0])
        assert failed > 0, out  # the bomb hit the wall
        if pids_dir:
            with open(pids_dir + "/pids.max") as f:
                assert f.read().strip() == "16"
            try:
                with open(pids_dir + "/pids.peak") as f:
                    assert int(f.read()) <= 16
            except FileNotFoundError:
                pass  # older kernels have no pids.peak
        neighbour.assert_unharmed()
    finally:
        final = kill(kernel, pid_)
        force_gone([pid])
    assert final["state"] == "KILLED"


def test_allocate_10_gb(kernel, layers, neighbour):
    rec, res, out = attack(kernel, """
        attempt("alloc_10g", lambda: len(bytearray(10 << 30)))
        chunks = []
        for i in range(128):                      # then 16 MiB at a time, touched, up to 2 GiB
            chunks.append(bytearray(16 << 20))
        print("allocated", len(chunks) * 16, "MiB", flush=True)
    """, limits={"memory_mb": 128})
    assert res["alloc_10g"] == "DENIED MemoryError", out
    assert "allocated" not in out, out
    assert (rec["state"] == "KILLED" and rec["reason"].startswith("OOMKilled")) or "MemoryError" in out, (rec, out)
    neighbour.assert_unharmed()


def test_spin_the_cpu(kernel, layers, neighbour):
    rec, res, out = attack(kernel, """
        print("spinning", flush=True)
        while True:
            pass
    """, limits={"cpu_seconds": 1, "wall_seconds": 60}, timeout=60)
    assert rec["state"] == "KILLED", (rec, out)
    assert rec["reason"].startswith("CPULimit") or rec["reason"] == "signal SIGXCPU", rec
    neighbour.assert_unharmed()


def test_fill_the_disk(kernel, layers, neighbour):
    rec, res, out = attack(kernel, """
        import time
        def one_big_file():
            with open("big", "wb") as f:
                for _ in range(64):
                    f.write(b"x" * (1 << 20))
        attempt("one_file", one_big_file)                 # RLIMIT_FSIZE: EFBIG at disk_mb
        os.unlink("big")
        for i in range(64):                               # many files each under the limit: up to 256 MiB
            with open(f"part{i}", "wb") as f:
                f.write(b"x" * (4 << 20))
            time.sleep(0.05)
        print("filled", flush=True)
    """, limits={"disk_mb": 8}, timeout=60)
    # RLIMIT_FSIZE stops the one file at disk_mb (EFBIG); the scratch dir then holds just over disk_mb, so
    # the kernel's disk sweep may kill the agent before it has even printed that.  With a tmpfs of its own
    # (a root kernel) the filesystem may refuse a part first (ENOSPC), a little above disk_mb
    assert res.get("one_file", "DENIED 27") == "DENIED 27", out
    assert "filled" not in out
    assert ((rec["state"] == "KILLED" and rec["reason"].startswith("DiskQuota"))
            or (rec["exit_status"] == 1 and "[Errno 28] No space left on device" in out)), (rec, out)
    neighbour.assert_unharmed()


def test_exhaust_file_descriptors(kernel, layers, neighbour):
    rec, res, out = attack(kernel, """
        fds = []
        def grab():
            while len(fds) < 10000:
                fds.append(os.open("/dev/null", os.O_RDONLY))
        attempt("grab", grab)
        print("got", len(fds), flush=True)
        for fd in fds:
            os.close(fd)
        from agentproc import client
        attempt("ping_after", lambda: client.default().call("sys.ping", timeout=10))
    """, limits={"open_files": 32})
    assert res["grab"] == "DENIED 24", out  # EMFILE
    assert int(out.split("got ")[1].split()[0]) < 32, out
    assert res["ping_after"] == "OK {'pong': True}", out
    neighbour.assert_unharmed()


def test_syscall_flood(kernel, layers, neighbour):
    pid_ = spawn(kernel, """
        import time
        from agentproc import client
        from agentproc.errors import EAGAIN
        c = client.default()
        ok = again = 0
        end = time.monotonic() + 2
        while time.monotonic() < end:
            try:
                c.call("sys.ping")
                ok += 1
            except EAGAIN:
                again += 1
        print("flood ok", ok, "eagain", again, flush=True)
    """, limits={"syscall_rate": 50})["id"]
    served = 0
    while kernel.record(pid_)["state"] in ("STARTING", "RUNNING"):  # the kernel keeps serving others
        assert kernel.client.call("sys.ping", timeout=10) == {"pong": True}
        served += 1
        time.sleep(0.05)
    out = kernel.output(pid_)
    assert "flood ok" in out, out
    again = int(out.split("eagain")[1].split()[0])
    assert again > 0 and served > 0, out
    neighbour.assert_unharmed()
