"""aiosctl (agentproc/ctl.py; docs/operating.md, "aiosctl"): ``--json`` on every command, errors and exit codes,
``kill -s SIGNAL``, ``run --restart``, and ``logs -f`` following a restart chain across a kernel restart."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from kernel.testing import TEST_CONFIG, KernelProc
from tests.conftest import REPO
from tests.test_restart import chain, running, until

SLEEPER = "import time\nprint('up', flush=True)\ntime.sleep(600)\n"


def ctl(k, *args, timeout=60, stdin=None):
    return subprocess.run([sys.executable, "-m", "agentproc.ctl", "--runtime-dir", str(k.runtime_dir), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, input=stdin)


def as_json(r: subprocess.CompletedProcess, status: int = 0):
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    return json.loads(r.stdout)


def json_lines(r: subprocess.CompletedProcess, status: int = 0) -> list:
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_every_command_speaks_json(kernel, tmp_path):
    prog = tmp_path / "hello.py"
    prog.write_text("import sys\nprint('hello', sys.argv[1:])\n")
    rec = as_json(ctl(kernel, "--json", "run", str(prog)))
    assert rec["state"] in ("STARTING", "RUNNING", "EXITED") and rec["restart"] == "no"
    lines = json_lines(ctl(kernel, "run", "--wait", "--json", str(prog), "x"))
    assert lines[0]["data"] == "hello ['x']\n" and lines[-1]["state"] == "EXITED" and lines[-1]["exit_status"] == 0
    agent = lines[-1]["id"]
    assert any(p["id"] == agent for p in as_json(ctl(kernel, "ps", "--json")))
    assert as_json(ctl(kernel, "--json", "logs", str(agent)))["output"] == "hello ['x']\n"
    lines = json_lines(ctl(kernel, "--json", "logs", "-f", str(agent)))
    assert lines[0] == {"id": agent, "fd": 1, "data": "hello ['x']\n"} and lines[-1]["id"] == agent
    assert as_json(ctl(kernel, "--json", "status"))["procs"]["total"] >= 2
    assert "aiosd_processes" in as_json(ctl(kernel, "--json", "metrics"))["text"]
    frame = json_lines(ctl(kernel, "--json", "top", "--once"))[0]
    assert set(frame) == {"time", "status", "procs"}
    put = as_json(ctl(kernel, "--json", "storage", "put", "ctl-ns", "k", stdin="v1"))
    assert put["key"] == "k" and put["version"] == 1
    assert as_json(ctl(kernel, "--json", "storage", "get", "ctl-ns", "k"))["data"] == "v1"
    assert [e["key"] for e in as_json(ctl(kernel, "--json", "storage", "ls", "ctl-ns"))] == ["k"]
    assert len(as_json(ctl(kernel, "--json", "storage", "versions", "ctl-ns", "k"))) == 1
    assert "granted" in as_json(ctl(kernel, "--json", "access", "ls", "ctl-ns"))
    assert as_json(ctl(kernel, "--json", "pending")) == {"pending": []}
    assert as_json(ctl(kernel, "--json", "audit", "--verify"))["intact"] is True
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text(SLEEPER)
    pid_ = as_json(ctl(kernel, "--json", "run", str(sleeper)))["id"]
    assert as_json(ctl(kernel, "--json", "kill", str(pid_)))["id"] == pid_
    # errors: JSON on stdout, the exit status unchanged
    err = as_json(ctl(kernel, "--json", "kill", "999999"), status=1)
    assert err["error"]["code"] == "ENOENT"
    r = ctl(kernel, "kill", "999999")
    assert r.returncode == 1 and r.stderr.startswith("aiosctl: ENOENT: ")
    err = as_json(subprocess.run([sys.executable, "-m", "agentproc.ctl", "--runtime-dir", str(tmp_path / "none"),
                                  "--json", "ps"], capture_output=True, text=True, timeout=60, cwd=REPO), status=3)
    assert err["error"]["code"] == "ENOKERNEL"
    assert ctl(kernel, "kill", "-s", "SIGBOGUS", "1").returncode == 2  # usage


def test_kill_with_a_signal(kernel, tmp_path):
    prog = tmp_path / "handler.py"
    prog.write_text("import signal, sys, time\n"
                    "signal.signal(signal.SIGUSR1, lambda *_: print('usr1', flush=True))\n"
                    "signal.signal(signal.SIGTERM, lambda *_: sys.exit(5))\n"
                    "print('up', flush=True)\ntime.sleep(600)\n")
    pid_ = int(ctl(kernel, "run", str(prog)).stdout)
    running(kernel, pid_)
    r = ctl(kernel, "kill", "-s", "USR1", str(pid_))
    assert r.returncode == 0 and "sent SIGUSR1" in r.stdout
    until(lambda: "usr1" in kernel.output(pid_), what="SIGUSR1 handled")
    assert ctl(kernel, "kill", "-s", "15", str(pid_)).returncode == 0
    assert kernel.wait(pid_)["exit_status"] == 5


def test_logs_follow_goes_on_across_a_kernel_restart(tmp_path, model_path):
    config = TEST_CONFIG.replace("[kernel]", "[kernel]\nrestart_delay_s = 0.1\ndrain_s = 0")
    k = KernelProc(tmp_path, config)
    follower = None
    try:
        prog = tmp_path / "agent.py"
        prog.write_text("import os, time\nprint('run of', os.getpid(), flush=True)\ntime.sleep(600)\n")
        first = int(ctl(k, "run", "--restart", "on-failure", str(prog)).stdout)
        until(lambda: k.output(first), what="the first run's output")
        follower = subprocess.Popen([sys.executable, "-m", "agentproc.ctl", "--runtime-dir", str(k.runtime_dir),
                                     "logs", "-f", str(first)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, cwd=REPO)
        time.sleep(1.0)
        k.kill9()
        k = k.restarted()
        second = until(lambda: k.record(first)["next"], what="the relaunch")
        until(lambda: k.output(second), what="the relaunch's output")
        assert ctl(k, "kill", str(second)).returncode == 0  # a stop: the chain ends, and so does the follow
        out, err = follower.communicate(timeout=60)
        assert follower.returncode == 0, err
        assert out.count("run of") == 2, (out, err)
        assert "went away" in err and f"following its relaunch {second}" in err, err
        assert [r["id"] for r in chain(k, first)] == [first, second]
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
            follower.wait()
        k.stop()
