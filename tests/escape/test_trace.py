"""Attacks on syscall traces (docs/abi.md, "Syscall traces"): reading another agent's trace, turning tracing on
from inside, and spending the kernel's memory through a trace."""
from __future__ import annotations

import pytest

from agentproc.errors import EAGAIN, ENOENT
from kernel.testing import Trace, config_text
from tests.escape.conftest import attack, denied, kill

pytestmark = pytest.mark.timeout(180)

VICTIM = """
import time
from agentproc import ping, storage
storage.put("diary", "victim-secret-77")
print("ready", flush=True)
while True:
    ping()
    time.sleep(0.2)
"""


def test_an_agent_can_neither_read_traces_nor_turn_tracing_on(kernel, neighbour):
    victim = kernel.spawn(VICTIM, name="victim", trace=True)["id"]
    kernel.wait_output(victim, "ready")
    try:
        rec, res, out = attack(kernel, f"""
            import json
            from agentproc import client, proc
            c = client.default()
            me = proc.self()["id"]
            attempt("read_victim", lambda: c.call("proc.trace", {{"id": {victim}}}))
            attempt("read_victim_discard", lambda: c.call("proc.trace", {{"id": {victim}, "discard": True}}))
            attempt("read_self", lambda: c.call("proc.trace", {{"id": me}}))
            attempt("spawn_traced", lambda: c.call("proc.spawn", {{"source": "pass", "trace": True}}))
            attempt("trace_in_ping", lambda: c.call("sys.ping", {{"trace": True}}))
            attempt("trace_in_ready", lambda: c.call("proc.ready", {{"layers": {{}}, "trace": True}}))
        """, name="snoop")
        for name in ("read_victim", "read_victim_discard", "read_self", "spawn_traced"):
            assert denied(res, name, "EPERM"), (name, out)
        assert denied(res, "trace_in_ping") and denied(res, "trace_in_ready"), out
        with pytest.raises(ENOENT):  # the attacker is still untraced
            kernel.client.call("proc.trace", {"id": rec["id"]})
        trace = Trace.fetch(kernel, victim)  # and the victim's trace is whole
        assert "storage.put" in trace.calls and trace.dropped == 0
        assert "victim-secret" not in out
    finally:
        kill(kernel, victim)
    neighbour.assert_unharmed()


FLOOD = """
import msgpack
from agentproc import client
sock = client.default().sock
big = "x" * 30000
frames = [
    {"call": "storage.put", "args": {"key": "k", "data": big}},
    {"call": "sys.ping", "args": {str(i): "y" * 500 for i in range(50)}},
    {"call": "sys.ping", "args": {"a": [[[[[[[["deep"] * 60] * 2] * 2] * 2] * 2] * 2] * 2]}},
    {"call": "nope." + "z" * 1000, "args": {"k": big}},
]
sent = 0
for i in range(400):
    msg = dict(frames[i % len(frames)], v=1, id=i + 1)
    sock.send(msgpack.packb(msg))
    sent += 1
    if sock.poll(2000):
        sock.recv()
sock.send(b"\\xc1 garbage")
print("SENT", sent, flush=True)
"""


def test_a_traced_agent_cannot_spend_kernel_memory_through_its_trace(make_kernel):
    k = make_kernel(config_text(kernel={"trace_kb": 64}))
    rec = k.wait(k.spawn(FLOOD, trace=True, limits={"syscall_rate": 1_000_000})["id"], 120)
    assert "SENT 400" in k.output(rec["id"]), k.output(rec["id"])
    page = k.client.call("proc.trace", {"id": rec["id"]})
    assert page["bytes"] <= 64 << 10 and page["dropped"] > 0, page["bytes"]
    trace = Trace.fetch(k, rec["id"])
    assert all(len(str(e["args"])) < 20000 for e in trace.entries)
    assert any(e.get("truncated") for e in trace.entries)
    status = k.client.call("sys.status")["traces"]
    assert status["reserved_bytes"] <= status["total_bytes"]
    assert k.client.call("sys.ping") == {"pong": True}


def test_traces_together_stay_within_the_total_and_fail_closed(make_kernel):
    k = make_kernel(config_text(kernel={"trace_kb": 1024, "trace_total_mb": 1}))
    first = k.spawn("import time\ntime.sleep(60)\n", trace=True)["id"]
    with pytest.raises(EAGAIN, match="trace_total_mb"):  # refused, never started untraced
        k.spawn("print('should not run')", trace=True, name="second")
    assert "second" not in {p["name"] for p in k.client.call("proc.list")["procs"]}
    untraced, _ = k.run("print('fine')")  # untraced agents are not held back
    assert untraced["exit_status"] == 0
    k.client.call("proc.kill", {"id": first})
    k.wait(first)
    later = k.spawn("pass", trace=True)["id"]  # the ended agent's trace made room
    k.wait(later)
    with pytest.raises(ENOENT):
        k.client.call("proc.trace", {"id": first})
    assert Trace.fetch(k, later).calls
