"""Escapes against other processes: debug or freeze the kernel, signal a neighbour, read their memory."""
from __future__ import annotations

import os
import signal

import pytest

from tests.escape.conftest import attack, denied, landlock_abi, need

pytestmark = pytest.mark.timeout(60)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("group", ["default", "trusted"])
def test_ptrace_and_stop_the_kernel(kernel, layers, neighbour, group):
    need(layers, "seccomp")
    if group == "trusted" and landlock_abi(layers) < 6:
        pytest.skip("signals from a group that may fork are confined by Landlock scopes (ABI >= 6); "
                    f"this machine has {layers.get('landlock')}")
    kpid = kernel.popen.pid
    try:
        rec, res, out = attack(kernel, """
            import signal
            kpid, npid = os.getppid(), int(sys.argv[1])
            attempt("ptrace_attach", lambda: raw(101, 16, kpid, 0, 0))       # PTRACE_ATTACH
            attempt("ptrace_seize", lambda: raw(101, 0x4206, kpid, 0, 0))    # PTRACE_SEIZE
            attempt("sigstop_kernel", lambda: os.kill(kpid, signal.SIGSTOP))
            attempt("sigkill_kernel", lambda: os.kill(kpid, signal.SIGKILL))
            attempt("sigkill_neighbour", lambda: os.kill(npid, signal.SIGKILL))
            attempt("killpg_neighbour", lambda: os.killpg(npid, signal.SIGKILL))
            # (no kill(-1, ...): it reports success even when every target refused, and should a defence
            # ever fail it would hit every process of the uid on the machine)
            attempt("tgkill_kernel", lambda: raw(234, kpid, kpid, signal.SIGSTOP))
            attempt("pidfd_signal", lambda: raw(424, os.pidfd_open(kpid), signal.SIGSTOP, 0, 0))
        """, argv=[neighbour.pid], group=group)
        assert rec["exit_status"] == 0, out
        assert res["ptrace_attach"] == "OK (-1, 1)" and res["ptrace_seize"] == "OK (-1, 1)", out
        for name in ("sigstop_kernel", "sigkill_kernel", "sigkill_neighbour", "killpg_neighbour",
                     "pidfd_signal"):
            assert denied(res, name) or res[name] == "OK (-1, 1)", (name, out)
        assert res["tgkill_kernel"] == "OK (-1, 1)", out
        assert _state(kpid) not in ("T", "t", "Z")
        neighbour.assert_unharmed()
    finally:
        os.kill(kpid, signal.SIGCONT)  # should the attack have frozen the shared kernel, thaw it


def test_proc_snooping(kernel, layers, neighbour):
    need(layers, "landlock")
    rec, res, out = attack(kernel, """
        kpid, npid = os.getppid(), int(sys.argv[1])
        attempt("kernel_environ", lambda: open(f"/proc/{kpid}/environ", "rb").read(64))
        attempt("kernel_cmdline", lambda: open(f"/proc/{kpid}/cmdline", "rb").read(64))
        def read_mem(pid):
            with open(f"/proc/{pid}/mem", "rb") as f:
                f.seek(0x400000)
                return f.read(16)
        attempt("kernel_mem", lambda: read_mem(kpid))
        attempt("neighbour_mem", lambda: read_mem(npid))
        attempt("neighbour_environ", lambda: open(f"/proc/{npid}/environ", "rb").read(64))
        attempt("neighbour_cwd", lambda: os.listdir(f"/proc/{npid}/cwd"))
        attempt("neighbour_root", lambda: os.listdir(f"/proc/{npid}/root/tmp"))
        local = ctypes.create_string_buffer(16)
        iov = (ctypes.c_void_p * 2)(ctypes.addressof(local), 16)
        remote = (ctypes.c_void_p * 2)(0x400000, 16)
        attempt("process_vm_readv", lambda: raw(310, npid, iov, 1, remote, 1, 0))
    """, argv=[neighbour.pid])
    assert rec["exit_status"] == 0, out
    for name in ("kernel_environ", "kernel_cmdline", "kernel_mem", "neighbour_mem", "neighbour_environ",
                 "neighbour_cwd", "neighbour_root"):
        assert denied(res, name), (name, out)
    assert res["process_vm_readv"] == "OK (-1, 1)" or not layers["seccomp"].startswith("on"), out
    neighbour.assert_unharmed()


def _limits(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as f:
        return f.read()


def test_same_uid_knobs_on_the_kernel(kernel, layers, neighbour):
    """An agent that shares the kernel's uid could lower its descriptor limit, renice it or pin it to one CPU."""
    need(layers, "seccomp")
    kpid = kernel.popen.pid
    before = (_limits(kpid), os.getpriority(os.PRIO_PROCESS, kpid), os.sched_getaffinity(kpid),
              os.sched_getscheduler(kpid))
    rec, res, out = attack(kernel, """
        import resource
        kpid, npid = os.getppid(), int(sys.argv[1])
        attempt("prlimit_kernel", lambda: resource.prlimit(kpid, resource.RLIMIT_NOFILE, (4, 4)))
        attempt("prlimit_neighbour", lambda: resource.prlimit(npid, resource.RLIMIT_AS, (1 << 20, 1 << 20)))
        attempt("renice_kernel", lambda: os.setpriority(os.PRIO_PROCESS, kpid, 19))
        attempt("renice_everyone", lambda: os.setpriority(os.PRIO_USER, os.getuid(), 19))
        attempt("pin_kernel", lambda: os.sched_setaffinity(kpid, {0}))
        attempt("idle_kernel", lambda: os.sched_setscheduler(kpid, os.SCHED_IDLE, os.sched_param(0)))
        attempt("ioprio_kernel", lambda: raw(251, 1, kpid, (3 << 13) | 7))   # IOPRIO_CLASS_IDLE
        attempt("own_limit", lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
    """, argv=[neighbour.pid])
    assert rec["exit_status"] == 0, out
    for name in ("prlimit_kernel", "prlimit_neighbour", "renice_kernel", "renice_everyone", "pin_kernel",
                 "idle_kernel"):
        assert denied(res, name, 1), (name, out)
    assert res["ioprio_kernel"] == "OK (-1, 1)" and res["own_limit"] == "OK None", out
    after = (_limits(kpid), os.getpriority(os.PRIO_PROCESS, kpid), os.sched_getaffinity(kpid),
             os.sched_getscheduler(kpid))
    assert after == before
    neighbour.assert_unharmed()
