"""Escapes by running other programs or reaching for kernel features: exec, setuid binaries, namespaces,
io_uring, process creation."""
from __future__ import annotations

import os

import pytest

from tests.escape.conftest import attack, denied, need

pytestmark = pytest.mark.timeout(60)


def test_exec_shell_system_and_raw_execve(kernel, layers, neighbour):
    need(layers, "seccomp")
    rec, res, out = attack(kernel, """
        import subprocess
        attempt("execv_sh", lambda: os.execv("/bin/sh", ["sh", "-c", "touch ran-execv"]))
        attempt("system", lambda: os.system("touch ran-system"))
        attempt("popen", lambda: subprocess.run(["/bin/sh", "-c", "touch ran-popen"]))
        attempt("posix_spawn", lambda: os.posix_spawn("/bin/sh", ["sh", "-c", "touch ran-spawn"], {}))
        argv = (ctypes.c_char_p * 4)(b"/bin/sh", b"-c", b"touch ran-raw", None)
        attempt("raw_execve", lambda: raw(59, b"/bin/sh", argv, None))
        attempt("raw_execveat", lambda: raw(322, -100, b"/bin/sh", argv, None, 0))
        attempt("memfd_exec", lambda: raw(322, raw(319, b"x", 0)[0], b"", argv, None, 0x1000))
        print("ran", sorted(f for f in os.listdir(".") if f.startswith("ran-")))
    """)
    assert rec["exit_status"] == 0, out
    assert denied(res, "execv_sh", 1) and denied(res, "popen", 1) and denied(res, "posix_spawn", 1), out
    assert res["raw_execve"] == "OK (-1, 1)" and res["raw_execveat"] == "OK (-1, 1)", out
    assert res["memfd_exec"] == "OK (-1, 1)", out
    assert res["system"] != "OK 0", out  # glibc's system() could not start a shell
    assert "ran []" in out, out
    neighbour.assert_unharmed()


def test_setuid_binary(kernel, layers, neighbour):
    need(layers, "seccomp", "prctl")
    setuid = [p for p in ("/usr/bin/passwd", "/usr/bin/su", "/bin/su", "/usr/bin/mount", "/usr/bin/newgrp")
              if os.path.exists(p) and os.stat(p).st_mode & 0o4000]
    if not setuid:
        pytest.skip("no setuid binary on this machine to try")
    rec, res, out = attack(kernel, """
        attempt("exec_setuid", lambda: os.execv(sys.argv[1], [sys.argv[1], "--help"]))
        attempt("no_new_privs", lambda: _libc.prctl(39, 0, 0, 0, 0))   # PR_GET_NO_NEW_PRIVS
    """, argv=[setuid[0]])
    assert rec["exit_status"] == 0, out
    assert denied(res, "exec_setuid", 1), out
    assert res["no_new_privs"] == "OK 1", out  # and were it to run, it could not gain privileges
    neighbour.assert_unharmed()


@pytest.mark.parametrize("group", ["default", "trusted"])
def test_namespaces(kernel, layers, neighbour, group):
    need(layers, "seccomp")
    rec, res, out = attack(kernel, """
        CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x00020000, 0x20000000, 0x40000000
        attempt("unshare_user", lambda: (_libc.unshare(CLONE_NEWUSER), ctypes.get_errno()))  # libc's unshare()
        attempt("unshare_mount", lambda: raw(272, CLONE_NEWNS))
        attempt("clone_newuser", lambda: raw(56, CLONE_NEWUSER | 17, 0, 0, 0, 0))
        attempt("clone_newpid", lambda: raw(56, CLONE_NEWPID | CLONE_NEWNET | 17, 0, 0, 0, 0))
        attempt("clone3", lambda: raw(435, 0, 0))
        attempt("setns", lambda: raw(308, os.open("/proc/1/ns/net", os.O_RDONLY), 0))
        attempt("mount", lambda: raw(165, b"none", b"/tmp", b"tmpfs", 0, 0))
        attempt("chroot", lambda: raw(161, b"."))
    """, group=group)
    assert rec["exit_status"] == 0, out
    for name in ("unshare_user", "unshare_mount", "clone_newuser", "clone_newpid", "mount", "chroot"):
        assert res[name] == "OK (-1, 1)", (name, out)
    assert res["clone3"] == "OK (-1, 38)", out  # ENOSYS: glibc falls back to clone, which is checked
    assert denied(res, "setns") or res["setns"] == "OK (-1, 1)", out
    neighbour.assert_unharmed()


def test_io_uring_and_other_kernel_surface(kernel, layers, neighbour):
    need(layers, "seccomp")
    rec, res, out = attack(kernel, """
        params = ctypes.create_string_buffer(120)
        attempt("io_uring_setup", lambda: raw(425, 8, params))
        attempt("bpf", lambda: raw(321, 0, 0, 0))
        attempt("perf_event_open", lambda: raw(298, params, 0, -1, -1, 0))
        attempt("userfaultfd", lambda: raw(323, 0))
        attempt("keyctl", lambda: raw(250, 0, 0))
        attempt("add_key", lambda: raw(248, b"user", b"k", b"v", 1, -3))
        attempt("init_module", lambda: raw(175, 0, 0, b""))
        attempt("kexec_load", lambda: raw(246, 0, 0, 0, 0))
        attempt("reboot", lambda: raw(169, 0xfee1dead, 672274793, 0x4321fedc, 0))
        attempt("syslog", lambda: raw(103, 3, params, 100))
        attempt("open_by_handle_at", lambda: raw(304, -100, params, 0))
        attempt("ptrace_traceme", lambda: raw(101, 0, 0, 0, 0))
        attempt("tiocsti", lambda: raw(16, 1, 0x5412, b"x"))
        attempt("x32_abi", lambda: raw(0x40000000 | 39))
    """)
    assert rec["exit_status"] == 0, out
    for name in ("io_uring_setup", "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "init_module",
                 "kexec_load", "reboot", "syslog", "open_by_handle_at", "ptrace_traceme", "tiocsti"):
        assert res[name] == "OK (-1, 1)", (name, out)
    assert res["x32_abi"] == "OK (-1, 38)", out
    neighbour.assert_unharmed()


def test_fork_denied_by_default(kernel, layers, neighbour):
    need(layers, "seccomp")
    rec, res, out = attack(kernel, """
        import multiprocessing, subprocess
        attempt("fork", os.fork)
        attempt("raw_fork", lambda: raw(57))
        attempt("raw_vfork_clone", lambda: raw(56, 0x4000 | 0x100 | 17, 0, 0, 0, 0))   # CLONE_VFORK|CLONE_VM
        attempt("multiprocessing", lambda: multiprocessing.get_context("fork").Process(target=print).start())
        import threading
        box = []
        t = threading.Thread(target=lambda: box.append(1)); t.start(); t.join()
        attempt("thread", lambda: box)
    """)
    assert rec["exit_status"] == 0, out
    assert denied(res, "fork", 1) and denied(res, "multiprocessing", 1), out
    assert res["raw_fork"] == "OK (-1, 1)" and res["raw_vfork_clone"] == "OK (-1, 1)", out
    assert res["thread"] == "OK [1]", out
    neighbour.assert_unharmed()
