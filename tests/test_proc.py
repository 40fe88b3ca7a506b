"""Processes (docs/abi.md 4: proc.*): spawn, identity, logs, kill and reap, shutdown, aiosctl."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from agentproc.errors import EPERM
from kernel.testing import pid_gone
from tests.conftest import REPO, STATE_DIR

SLEEPER = """
    import time
    from agentproc import ping
    ping()
    print("ready", flush=True)
    time.sleep(600)
"""


def wait_running(kernel, pid_, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = kernel.record(pid_)
        if rec["state"] == "RUNNING" and "ready" in kernel.output(pid_):
            return rec
        time.sleep(0.05)
    raise AssertionError(f"agent {pid_} never got ready: {kernel.output(pid_)}")


def test_spawn_runs_program_as_main_with_argv(kernel):
    rec, out = kernel.run("""
        import os, sys
        from agentproc import proc
        me = proc.self()
        print("main", __name__, os.path.basename(sys.argv[0]), sys.argv[1:])
        print("me", me["id"], me["name"], me["group"], me["pid"] == os.getpid(), me["state"])
        print("env", sorted(k for k in os.environ if k.startswith("AIOSD")))
        print("cwd", os.getcwd().endswith("/scratch/" + str(me["id"])))
    """, name="hello", argv=["a", "b c"])
    assert rec["state"] == "EXITED" and rec["exit_status"] == 0, out
    assert "main __main__ agent.py ['a', 'b c']" in out
    assert f"me {rec['id']} hello default True RUNNING" in out
    assert "env []" in out and "cwd True" in out
    assert rec["first_syscall_at"] >= rec["started_at"]
    assert rec["usage"]["syscalls"] >= 1


def test_exit_status_and_stderr_are_captured(kernel):
    rec, out = kernel.run("""
        import sys
        print("to stdout")
        print("to stderr", file=sys.stderr)
        raise SystemExit(7)
    """)
    assert rec["state"] == "EXITED" and rec["exit_status"] == 7
    assert "to stdout" in out and "to stderr" in out


def test_uncaught_exception_exits_1_with_traceback(kernel):
    rec, out = kernel.run("raise ValueError('boom')\n")
    assert rec["exit_status"] == 1 and "ValueError: boom" in out


def test_kill_reaps_and_records_reason(kernel):
    pid_ = kernel.spawn(SLEEPER, name="sleeper")["id"]
    rec = wait_running(kernel, pid_)
    kernel.client.call("proc.kill", {"id": pid_})
    rec = kernel.wait(pid_)
    assert rec["state"] == "KILLED" and rec["exit_status"] == -signal.SIGKILL
    assert rec["reason"].startswith("killed by operator")
    assert pid_gone(rec["pid"])
    # killing an ended process is not an error and changes nothing
    assert kernel.client.call("proc.kill", {"id": pid_})["state"] == "KILLED"


def test_death_by_signal_is_recorded(kernel):
    rec, _ = kernel.run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    assert rec["state"] == "KILLED" and rec["reason"] == "signal SIGSEGV" and rec["exit_status"] == -11


def test_agent_may_kill_itself_but_not_others(kernel):
    victim = kernel.spawn(SLEEPER, name="victim")["id"]
    wait_running(kernel, victim)
    rec, out = kernel.run(f"""
        from agentproc import proc
        from agentproc.errors import EPERM
        try:
            proc.kill({victim})
        except EPERM as e:
            print("EPERM", e)
        print("visible", [p["id"] for p in proc.list()] == [proc.self()["id"]])
        proc.kill(proc.self()["id"])
    """)
    assert "EPERM" in out and "visible True" in out, out
    assert rec["state"] == "KILLED"
    assert kernel.record(victim)["state"] == "RUNNING"
    kernel.client.call("proc.kill", {"id": victim})
    kernel.wait(victim)


def test_untrusted_group_lacks_proc_privilege(kernel):
    rec, out = kernel.run("""
        from agentproc import proc, ping
        from agentproc.errors import EPERM
        print(ping())
        try:
            proc.list()
        except EPERM as e:
            print("EPERM", e)
    """, group="untrusted")
    assert "{'pong': True}" in out and "EPERM" in out and "privilege 'proc'" in out, out


def test_spawn_unknown_group_is_enoent(kernel):
    from agentproc.errors import ENOENT
    with pytest.raises(ENOENT):
        kernel.spawn("pass", group="wizards")


def test_logs_stream_follow_until_exit(kernel):
    pid_ = kernel.spawn("""
        import time, sys
        for i in range(3):
            print("line", i, flush=True)
            time.sleep(0.2)
        print("err", file=sys.stderr)
        raise SystemExit(3)
    """)["id"]
    s = kernel.client.stream("proc.logs", {"id": pid_, "follow": True})
    pieces = list(s)
    out = "".join(p["data"] for p in pieces if p["fd"] == 1)
    err = "".join(p["data"] for p in pieces if p["fd"] == 2)
    assert out == "line 0\nline 1\nline 2\n" and err == "err\n"
    assert s.result["state"] == "EXITED" and s.result["exit_status"] == 3


def test_two_agents_at_once_get_independent_answers(kernel):
    prompts = {"a": "The capital of France is", "b": "def fibonacci(n):"}
    expected = {k: kernel.client.call("llm.generate", {"prompt": p, "max_tokens": 12})["text"]
                for k, p in prompts.items()}
    ids = {k: kernel.spawn(f"""
        from agentproc import llm
        print("ANSWER" + repr(llm.generate({p!r}, max_tokens=12).text))
    """, name=k)["id"] for k, p in prompts.items()}
    for k, pid_ in ids.items():
        rec = kernel.wait(pid_)
        assert rec["exit_status"] == 0
        assert "ANSWER" + repr(expected[k]) in kernel.output(pid_)
    assert expected["a"] != expected["b"]


def test_sigterm_stops_kernel_and_its_agents(fresh_kernel):
    k = fresh_kernel
    ids = [k.spawn(SLEEPER)["id"] for _ in range(2)]
    pids = [wait_running(k, i)["pid"] for i in ids]
    k.popen.send_signal(signal.SIGTERM)
    assert k.popen.wait(15) == 0
    assert all(pid_gone(p) for p in pids)
    assert not (k.runtime_dir / "kernel.sock").exists()
    assert "shutting down: SIGTERM" in k.log()


def test_agents_die_when_kernel_is_killed(fresh_kernel):
    k = fresh_kernel
    pid = wait_running(k, k.spawn(SLEEPER)["id"])["pid"]
    k.popen.kill()
    k.popen.wait(10)
    assert pid_gone(pid)


def ctl(kernel, *args, timeout=60):
    return subprocess.run([sys.executable, "-m", "agentproc.ctl", "--runtime-dir", str(kernel.runtime_dir), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_aiosctl_run_wait_ps_logs_kill(kernel, tmp_path):
    prog = tmp_path / "greeter.py"
    prog.write_text("import sys\nprint('hi', sys.argv[1:])\nprint('oops', file=sys.stderr)\nsys.exit(4)\n")
    r = ctl(kernel, "run", "--wait", "--name", "greeter", str(prog), "x")
    assert r.returncode == 4 and r.stdout == "hi ['x']\n" and r.stderr == "oops\n"
    r = ctl(kernel, "ps", "--json")
    procs = json.loads(r.stdout)
    g = [p for p in procs if p["name"] == "greeter"][-1]
    assert g["state"] == "EXITED" and g["exit_status"] == 4
    assert "greeter" in ctl(kernel, "ps").stdout
    assert ctl(kernel, "logs", str(g["id"])).stdout == "hi ['x']\noops\n"
    prog.write_text(textwrap.dedent(SLEEPER))
    r = ctl(kernel, "run", "--memory-mb", "300", "--llm-tokens", "5000", str(prog))
    new_id = int(r.stdout)
    rec = wait_running(kernel, new_id)
    assert rec["limits"]["memory_mb"] == 300 and rec["limits"]["llm_tokens"] == 5000
    assert rec["limits"]["open_files"] == 256  # the default group's, not overridden
    assert rec["layers"]["rlimits"].startswith("on") and rec["layers"]["prctl"].startswith("on")
    ps = ctl(kernel, "ps").stdout
    row = [line for line in ps.splitlines() if line.startswith(f"{new_id} ")][0]
    assert "mem=300M" in row and "tokens=5000" in row and "rlimits" in row and "LAYERS" in ps
    assert ctl(kernel, "kill", str(new_id)).returncode == 0
    assert kernel.wait(new_id)["state"] == "KILLED"
    r = ctl(kernel, "kill", "9999")
    assert r.returncode == 1 and "ENOENT" in r.stderr
    r = ctl(kernel, "status")
    assert r.returncode == 0 and "sandbox seccomp" in r.stdout and "model default" in r.stdout, r.stdout


def test_aiosctl_status_without_kernel_exits_3(tmp_path):
    r = subprocess.run([sys.executable, "-m", "agentproc.ctl", "--runtime-dir", str(tmp_path), "status"],
                       capture_output=True, text=True, timeout=30, cwd=REPO)
    assert r.returncode == 3 and "no kernel" in r.stderr


def test_shutdown_syscall_is_admin_only(fresh_kernel):
    k = fresh_kernel
    rec, out = k.run("""
        from agentproc import client
        from agentproc.errors import EPERM
        try:
            client.default().call("sys.shutdown")
        except EPERM:
            print("EPERM")
    """)
    assert "EPERM" in out
    assert k.client.call("sys.shutdown") == {"ok": True}
    assert k.popen.wait(15) == 0


def test_second_kernel_on_same_runtime_dir_refuses(kernel):
    r = subprocess.run([sys.executable, "-m", "kernel.main", "--runtime-dir", str(kernel.runtime_dir),
                        "--config", str(kernel.config_path), "--state-dir", str(STATE_DIR)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 1 and "already serves" in r.stderr
    assert kernel.client.call("sys.ping") == {"pong": True}
