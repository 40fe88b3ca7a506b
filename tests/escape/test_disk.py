"""Escapes by disk: endless files, directories, unlinked-but-open files, a stdout flood, a full disk.

``disk_mb`` bounds an agent's scratch (blocks, directories and unlinked open files included) plus its captured
output; ``disk_inodes`` bounds its files + directories (docs/sandbox.md, "Disk").  Each attack runs against
both ways the kernel measures a scratch dir: a tmpfs of the agent's own (a root kernel that may mount; the
filesystem refuses with ENOSPC and the kernel kills with ``DiskQuota``), and the walk off the event loop
(``[sandbox] scratch_tmpfs = false`` here; what an unprivileged kernel does), where the kernel kills.  In
both, the kernel keeps serving without a stall and a neighbour agent is unharmed.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernel.disk import walk
from sandbox import scratchfs
from kernel.testing import TEST_CONFIG, KernelProc
from tests.escape.conftest import Neighbour, kill, neighbour_of, spawn, wait_output

pytestmark = pytest.mark.timeout(60)

WALK_CONFIG = TEST_CONFIG + "\n[sandbox]\nscratch_tmpfs = false\n"


@pytest.fixture(scope="module", params=["tmpfs", "walk"])
def disk_kernel(request, tmp_path_factory):
    """A kernel measuring scratch dirs one way: the session kernel with tmpfs mounts, or one that walks."""
    if request.param == "tmpfs":
        k = request.getfixturevalue("shared_kernel")
        status = k.client.call("sys.status")["sandbox"].get("disk", "unavailable: not reported")
        if not status.startswith("available"):
            pytest.skip(f"no tmpfs per agent here: {status}")
        yield k
        return
    request.getfixturevalue("model_path")
    k = KernelProc(tmp_path_factory.mktemp("walk-kernel"), WALK_CONFIG)
    yield k
    k.stop()


@pytest.fixture
def near(disk_kernel):
    with neighbour_of(disk_kernel) as n:
        yield n


def _ended(kernel, pid_: int, timeout: float = 20) -> dict:
    """The agent's final record; it is killed (and the test fails) if it is still alive after ``timeout``."""
    try:
        return kernel.wait(pid_, timeout)
    except AssertionError:
        kill(kernel, pid_)
        raise AssertionError(f"agent {pid_} was not stopped in {timeout} s: {kernel.output(pid_)[-2000:]}")


def _disk_quota(rec: dict) -> bool:
    return rec["state"] == "KILLED" and (rec["reason"] or "").startswith("DiskQuota")


def _gone(path: Path, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not path.exists()


def test_endless_files_are_stopped_by_the_inode_limit(disk_kernel, near):
    rec = spawn(disk_kernel, """
        import time
        n = 0
        def make():
            global n
            while n < 200_000:
                open(f"f{n}", "w").close()
                n += 1
        attempt("files", make)
        print("made", n, flush=True)
        time.sleep(30)
    """, limits={"disk_mb": 64, "disk_inodes": 2000})
    final = _ended(disk_kernel, rec["id"])
    out = disk_kernel.output(rec["id"])
    assert _disk_quota(final) and "inodes" in final["reason"], (final, out)
    if disk_kernel.client.call("sys.status")["sandbox"]["disk"].startswith("available"):
        assert "files DENIED 28" in out, out  # the tmpfs refused the inode past the limit (ENOSPC)
    near.assert_unharmed()
    assert _gone(Path(disk_kernel.runtime_dir) / "scratch" / str(rec["id"]))  # removed, off the event loop


def test_many_files_do_not_stall_the_kernel(disk_kernel, near):
    """200,000 empty files: measuring them each second, then removing them, never blocks the event loop."""
    rec = spawn(disk_kernel, """
        import time
        for i in range(200_000):
            open(f"f{i}", "w").close()
        print("made", flush=True)
        time.sleep(30)
    """, limits={"disk_mb": 64, "disk_inodes": 250_000}, name="many-files")
    pid_ = rec["id"]
    try:
        wait_output(disk_kernel, pid_, "made", timeout=45)
        worst = _worst_ping(disk_kernel, 2.5)
        assert worst < 0.4, f"sys.ping took {worst:.3f} s while the kernel measured 200k files"
    finally:
        kill(disk_kernel, pid_)
    worst = _worst_ping(disk_kernel, 1.5)  # while the scratch dir is being removed
    assert worst < 0.4, f"sys.ping took {worst:.3f} s while the kernel removed 200k files"
    near.assert_unharmed()
    assert _gone(Path(disk_kernel.runtime_dir) / "scratch" / str(pid_))


def _worst_ping(kernel, seconds: float) -> float:
    worst, end = 0.0, time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.monotonic()
        assert kernel.client.call("sys.ping", timeout=10) == {"pong": True}
        worst = max(worst, time.monotonic() - t)
        time.sleep(0.01)
    return worst


def test_unlinked_open_files_are_counted(disk_kernel, near):
    """16 MiB in four files that have no name left but stay open: invisible to a plain walk of scratch."""
    rec = spawn(disk_kernel, """
        import time
        held = []
        def hide():
            for i in range(4):
                f = open(f"h{i}", "wb")
                os.unlink(f"h{i}")
                held.append(f)
                for _ in range(4):
                    f.write(b"x" * (1 << 20))
                    f.flush()
        attempt("hide", hide)
        print("hidden", os.listdir("."), flush=True)
        time.sleep(30)
    """, limits={"disk_mb": 8})
    final = _ended(disk_kernel, rec["id"])
    out = disk_kernel.output(rec["id"])
    assert _disk_quota(final) and "MB" in final["reason"], (final, out)
    near.assert_unharmed()


def test_many_directories_are_counted(disk_kernel, near):
    rec = spawn(disk_kernel, """
        import time
        n = 0
        def make():
            global n
            while n < 20_000:
                os.makedirs(f"d{n}/e")
                n += 2
        attempt("dirs", make)
        print("made", n, flush=True)
        time.sleep(30)
    """, limits={"disk_mb": 64, "disk_inodes": 1000})
    final = _ended(disk_kernel, rec["id"])
    out = disk_kernel.output(rec["id"])
    assert _disk_quota(final), (final, out)
    near.assert_unharmed()


def test_stdout_flood_is_capped_and_counted(disk_kernel, near):
    """Output counts against disk_mb: the log stops at it with a marker line and the agent is killed."""
    rec = spawn(disk_kernel, """
        import sys
        line = "y" * 1023 + "\\n"
        for i in range(256 * 1024):   # 256 MiB
            sys.stdout.write(line)
        print("flooded", flush=True)
    """, limits={"disk_mb": 4})
    final = _ended(disk_kernel, rec["id"], timeout=30)
    out = disk_kernel.output(rec["id"])
    assert _disk_quota(final), (final, out[-500:])
    assert "flooded" not in out
    log = Path(disk_kernel.runtime_dir) / "logs" / f"{rec['id']}.log"
    size = log.stat().st_size
    assert size <= (4 << 20) + 200, size
    with open(log, "rb") as f:
        f.seek(-200, os.SEEK_END)
        assert b"output truncated" in f.read()
    near.assert_unharmed()


def test_walk_counts_blocks_of_directories_inodes_and_unlinked_files(tmp_path):
    """The walk an unprivileged kernel relies on, without a kernel."""
    root = tmp_path / "scratch"
    root.mkdir()
    empty_dir = walk(str(root))
    for i in range(50):
        (root / f"d{i}").mkdir()
    b, n = walk(str(root))
    assert n == 50 and b >= empty_dir[0] + 50 * os.lstat(root / "d0").st_blocks * 512
    (root / "f").write_bytes(b"x" * 100_000)
    os.link(root / "f", root / "g")  # a hard link is one inode, counted once
    b2, n2 = walk(str(root))
    assert n2 == 51 and b2 - b >= 100_000
    holder = subprocess.Popen(  # a process holding a 1 MB file open after unlinking it
        [sys.executable, "-c", "import os, sys, time\n"
         "f = open(sys.argv[1], 'wb'); f.write(b'y' * 1_000_000); f.flush(); os.unlink(sys.argv[1])\n"
         "print('held', flush=True); time.sleep(30)", str(root / "h")], stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert walk(str(root)) == (b2, n2)
        b3, n3 = walk(str(root), [holder.pid])
        assert n3 == 52 and b3 - b2 >= 1_000_000
    finally:
        holder.kill()
        holder.wait()
    assert walk(str(root), max_inodes=10)[1] == 11  # bounded: it stops once over


@pytest.mark.parametrize("how", ["tmpfs", "fsize"])
def test_a_full_disk_does_not_kill_the_kernel(tmp_path, model_path, how):
    """The runtime dir fills up (a small tmpfs as root; else RLIMIT_FSIZE on the kernel, so that writing an
    agent's log fails with EFBIG) while an agent keeps printing: the kernel stops writing that log, says so
    once, and goes on serving."""
    run = tmp_path / "run"
    run.mkdir()
    mounted = False
    preexec = None
    if how == "tmpfs":
        why = scratchfs.unavailable_reason(str(tmp_path))
        if why:
            pytest.skip(f"cannot mount a small tmpfs as the runtime dir: {why}")
        scratchfs.mount(str(run), size_mb=8, inodes=None)
        mounted = True
    else:
        def preexec():
            resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))
    try:
        k = KernelProc(tmp_path, preexec_fn=preexec)
        try:
            near = Neighbour(k)
            pid_ = spawn(k, """
                for i in range(32):
                    print("z" * (1 << 20), flush=True)
                print("printed all", flush=True)
            """, limits={"disk_mb": 64})["id"]
            rec = k.wait(pid_, 30)
            assert k.popen.poll() is None, k.log()
            assert k.client.call("sys.ping") == {"pong": True}
            assert rec["exit_status"] == 0, (rec, k.output(pid_)[-300:])
            assert "printed all" in k.output(pid_)  # the output is still kept in memory
            warned = k.log_path.read_text(errors="replace").count(f"cannot write the log {run}/logs/{pid_}.log")
            assert warned == 1, k.log()
            try:  # a new agent starts, or the kernel says clearly why not
                rec2, out2 = k.run("print('still here')", timeout=30)
                assert rec2["exit_status"] == 0 and "still here" in out2, (rec2, out2)
            except Exception as exc:
                assert type(exc).__name__ == "EAGAIN" and "free space" in str(exc), exc
            near.assert_unharmed()
            assert k.popen.poll() is None
        finally:
            k.stop()
    finally:
        if mounted:
            scratchfs.unmount(str(run))
