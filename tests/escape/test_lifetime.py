"""Escapes in time: descendants that try to outlive their agent, or the kernel."""
from __future__ import annotations

import re

import pytest

from tests.escape.conftest import force_gone, kill, need, pid_gone, spawn, wait_output

pytestmark = pytest.mark.timeout(60)

ESCAPEES = """
import os, sys, time
def double_fork(tag):
    r, w = os.pipe()
    if os.fork() == 0:                 # child: new session, fork again, exit -> grandchild is an orphan
        os.setsid()
        if os.fork() == 0:
            os.write(w, str(os.getpid()).encode())
            os.close(w)
            time.sleep(120)
            os._exit(0)
        os._exit(0)
    os.close(w)
    pid = int(os.read(r, 32))
    os.wait()
    print(tag, pid, flush=True)
child = os.fork()
if child == 0:
    time.sleep(120)
    os._exit(0)
print("child", child, flush=True)
double_fork("grandchild")
print("ready", flush=True)
time.sleep(120)
"""


def _pids(out: str) -> dict[str, int]:
    return {tag: int(pid) for tag, pid in re.findall(r"^(child|grandchild) (\d+)$", out, re.M)}


def test_double_fork_does_not_outlive_a_kill(kernel, layers, neighbour):
    """The grandchild left the agent's process group and session; the agent's cgroup still holds it."""
    need(layers, "cgroup")
    rec = spawn(kernel, ESCAPEES, group="trusted", prelude=False)
    pids = {}
    try:
        pids = _pids(wait_output(kernel, rec["id"], "ready"))
        assert set(pids) == {"child", "grandchild"}
        assert not pid_gone(pids["grandchild"], timeout=0.2)  # it is out there, re-parented to the kernel
        final = kill(kernel, rec["id"])
        assert final["state"] == "KILLED"
        assert pid_gone(pids["child"], timeout=5) and pid_gone(pids["grandchild"], timeout=5)
        neighbour.assert_unharmed()
    finally:
        force_gone(pids.values())


def test_nothing_outlives_the_kernel(fresh_kernel, layers):
    """kill -9 the kernel: the agent dies with it (PDEATHSIG), its descendants through the watchdog."""
    need(layers, "cgroup")
    k = fresh_kernel
    rec = spawn(k, ESCAPEES, group="trusted", prelude=False)
    pids = {}
    try:
        pids = _pids(wait_output(k, rec["id"], "ready"))
        pids["agent"] = rec["pid"]
        k.popen.kill()
        k.popen.wait(10)
        for tag, pid in pids.items():
            assert pid_gone(pid, timeout=10), f"the {tag} (pid {pid}) outlived the kernel"
    finally:
        force_gone(pids.values())
