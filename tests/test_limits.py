"""Resource limits (docs/abi.md 4, proc.spawn limits): accounting, kill with a reason, quotas, rate limits.

Each test runs the offending agent through the real kernel next to a neighbour agent, and checks that only the
offender is touched and that the kernel keeps serving.
"""
from __future__ import annotations

from tests.test_proc import SLEEPER, wait_running


def spawn_limited(kernel, source: str, **limits) -> int:
    import textwrap
    return kernel.client.call("proc.spawn", {"source": textwrap.dedent(source), "limits": limits})["id"]


def with_neighbour(kernel, check):
    neighbour = kernel.spawn(SLEEPER, name="neighbour")["id"]
    wait_running(kernel, neighbour)
    try:
        check()
        assert kernel.record(neighbour)["state"] == "RUNNING"
        assert kernel.client.call("sys.ping") == {"pong": True}
    finally:
        kernel.client.call("proc.kill", {"id": neighbour})


def test_memory_limit_kills_with_oomkilled(kernel):
    def check():
        pid_ = spawn_limited(kernel, """
            import time
            hog = []
            for _ in range(40):
                hog.append(bytearray(20 << 20))   # touch 20 MB at a time
                time.sleep(0.05)
            print("survived", flush=True)
        """, memory_mb=100)
        rec = kernel.wait(pid_)
        assert rec["state"] == "KILLED" and rec["reason"].startswith("OOMKilled"), rec
        assert "survived" not in kernel.output(pid_)
    with_neighbour(kernel, check)


def test_cpu_limit_kills_with_cpulimit(kernel):
    def check():
        pid_ = spawn_limited(kernel, "while True:\n    pass\n", cpu_seconds=1)
        rec = kernel.wait(pid_, timeout=30)
        assert rec["state"] == "KILLED" and rec["reason"].startswith("CPULimit"), rec
    with_neighbour(kernel, check)


def test_wall_time_limit(kernel):
    pid_ = spawn_limited(kernel, "import time\ntime.sleep(60)\n", wall_seconds=1)
    rec = kernel.wait(pid_, timeout=30)
    assert rec["state"] == "KILLED" and rec["reason"].startswith("WallTimeLimit"), rec
    assert rec["ended_at"] - rec["started_at"] < 10


def test_token_quota_clamps_then_edquot(kernel):
    pid_ = spawn_limited(kernel, """
        from agentproc import llm
        from agentproc.errors import EDQUOT
        a = llm.generate("The capital of France is", max_tokens=100)
        print("first", a.usage["prompt_tokens"], a.usage["completion_tokens"], a.finish_reason)
        try:
            llm.generate("The capital of France is", max_tokens=5)
        except EDQUOT as e:
            print("EDQUOT", e)
    """, llm_tokens=20)
    rec = kernel.wait(pid_)
    out = kernel.output(pid_)
    assert rec["exit_status"] == 0, out
    assert "first 6 14 length" in out  # 20 - 6 prompt tokens = at most 14 generated
    assert "EDQUOT" in out and "20 of 20" in out
    assert rec["usage"]["llm_tokens"] == 20


def test_syscall_rate_limit_gives_eagain(kernel):
    pid_ = spawn_limited(kernel, """
        from agentproc import client
        from agentproc.errors import EAGAIN
        c = client.default()
        refused = 0
        for _ in range(300):
            try:
                c.call("sys.ping")
            except EAGAIN:
                refused += 1
        print("refused", refused)
    """, syscall_rate=50)
    rec = kernel.wait(pid_)
    out = kernel.output(pid_)
    assert rec["exit_status"] == 0, out
    refused = int(out.split("refused ")[1].split()[0])
    assert refused > 100, out  # 300 pings in far less than 6 s against 50/s with a burst of 50


def test_limits_in_record_merge_group_defaults_and_flags(kernel):
    rec = kernel.client.call("proc.spawn", {"source": "pass", "group": "untrusted", "limits": {"memory_mb": 64}})
    assert rec["limits"]["memory_mb"] == 64 and rec["limits"]["llm_tokens"] == 100_000
    assert set(rec["limits"]) == {"memory_mb", "cpu_seconds", "wall_seconds", "procs", "open_files", "disk_mb",
                                  "disk_inodes", "llm_tokens", "syscall_rate", "storage_mb", "storage_keys"}
    kernel.wait(rec["id"])
