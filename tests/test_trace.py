"""Syscall traces (docs/abi.md, "Syscall traces"): recorded per agent by the kernel, read with proc.trace and
``aiosctl trace``, saved, loaded, replayed and compared through the test kit's ``Trace``."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agentproc.errors import ENOENT
from kernel.testing import Trace, config_text

pytestmark = pytest.mark.timeout(180)

AGENT = """
from agentproc import client, llm, ping, storage
from agentproc.errors import SyscallError
ping()
storage.put("notes/a", "hello")
print(llm.generate("The capital of France is", max_tokens=4, seed=1).text)
for piece in llm.generate("One, two,", max_tokens=3, stream=True):
    pass
try:
    client.default().call("proc.fork")
except SyscallError as e:
    print("refused", e.code)
try:
    client.default().call("storage.get", {"key": 7})
except SyscallError as e:
    print("refused", e.code)
"""


def traced_run(kernel, source: str, **kw) -> tuple[dict, Trace]:
    rec = kernel.wait(kernel.spawn(source, trace=True, **kw)["id"])
    assert rec["exit_status"] == 0, kernel.output(rec["id"])
    return rec, Trace.fetch(kernel, rec["id"])


def test_a_traced_agent_has_its_calls_arguments_results_and_errors_recorded(kernel):
    rec, trace = traced_run(kernel, AGENT, name="traced")
    assert trace.name == "traced" and trace.dropped == 0
    boot = trace.calls.index("proc.ready") + 1  # the bootstrap's own calls come first
    program = [e for e in trace.entries[boot:] if e["call"] != "proc.self"]  # the SDK asks for max_frame
    assert [e["call"] for e in program] == ["sys.ping", "storage.put", "llm.generate", "llm.generate", "proc.fork",
                                            "storage.get"], trace.calls
    assert trace.errors == [("proc.fork", "ENOSYS"), ("storage.get", "EINVAL")]
    ping, put, gen, stream = program[:4]
    assert ping["result"] == {"pong": True} and ping["args"] == {}
    assert put["args"]["key"] == "notes/a" and put["result"]["version"] == 1
    assert gen["args"]["prompt"] == "The capital of France is" and gen["result"]["text"]
    assert stream["chunks"] >= 1 and stream["ok"]
    assert [e["seq"] for e in trace.entries] == list(range(1, len(trace.entries) + 1))
    assert all(e["ms"] >= 0 for e in trace.entries)
    assert [e["t"] for e in trace.entries] == sorted(e["t"] for e in trace.entries)


def test_an_untraced_agent_has_no_trace(kernel):
    rec, _ = kernel.run("pass")
    with pytest.raises(ENOENT, match="not traced"):
        kernel.client.call("proc.trace", {"id": rec["id"]})


def test_long_arguments_are_cut_and_bytes_summarised(kernel):
    rec, trace = traced_run(kernel, """
        from agentproc import storage
        storage.put("long", "x" * 5000)
        storage.put("blob", b"\\x00" * 100)
    """)
    long, blob = trace.entries[-2:]
    assert long["truncated"] == ["args"] and len(long["args"]["data"]) < 600
    assert blob["args"]["data"] == {"bytes": 100} and blob["truncated"] == ["args"]


def test_save_load_and_replay_match(kernel, tmp_path):
    rec, trace = traced_run(kernel, """
        from agentproc import llm, ping
        ping()
        llm.generate("Roses are", max_tokens=5, seed=3)
        llm.models()
    """)
    trace.save(tmp_path / "t.json")
    loaded = Trace.load(tmp_path / "t.json")
    assert loaded.entries == trace.entries and loaded.name == trace.name
    replayed = loaded.replay(kernel)  # raises if a result differs
    assert replayed.calls[-3:] == ["sys.ping", "llm.generate", "llm.models"]  # after the bootstrap's


def test_assert_matches_names_the_first_difference(kernel):
    _, one = traced_run(kernel, "from agentproc import llm\nllm.generate('Roses are', max_tokens=4)\n")
    _, same = traced_run(kernel, "from agentproc import llm\nllm.generate('Roses are', max_tokens=4)\n")
    _, other = traced_run(kernel, "from agentproc import llm\nllm.generate('Violets are', max_tokens=4)\n")
    one.assert_matches(same)
    with pytest.raises(AssertionError, match="arguments differ"):
        one.assert_matches(other)
    with pytest.raises(AssertionError, match="calls here"):
        one.assert_matches(Trace(one.entries[:1]))


def test_a_replay_that_answers_differently_fails(kernel):
    _, trace = traced_run(kernel, "from agentproc import ping\nping()\n")
    assert trace.entries[-1]["result"] == {"pong": True}
    with pytest.raises(AssertionError, match="results differ"):
        Trace([trace.entries[-1] | {"result": {"pong": False}}]).replay(kernel)


@pytest.mark.fresh_kernel(config=config_text(kernel={"trace_kb": 4}))
def test_a_trace_keeps_its_budget_dropping_the_oldest(kernel):
    rec, trace = traced_run(kernel, "from agentproc import ping\nfor _ in range(300): ping()\n")
    page = kernel.client.call("proc.trace", {"id": rec["id"]})
    assert page["dropped"] > 0 and page["bytes"] <= 4096 and trace.dropped == page["dropped"]
    assert trace.entries[-1]["seq"] > 300 and trace.entries[0]["seq"] > 3


@pytest.mark.fresh_kernel(config=config_text(kernel={"trace_all": True, "max_frame": 4096}))
def test_trace_all_pages_and_discard(kernel):
    rec, _ = kernel.run("from agentproc import ping\nfor _ in range(100): ping()\n")
    first = kernel.client.call("proc.trace", {"id": rec["id"]})
    assert first["more"] and len(first["entries"]) < 101
    trace = Trace.fetch(kernel, rec["id"], discard=True)
    assert len(trace.entries) == trace.entries[-1]["seq"] > 100 and "proc.ready" in trace.calls
    with pytest.raises(ENOENT):
        kernel.client.call("proc.trace", {"id": rec["id"]})


def test_aiosctl_run_trace_and_trace_save(kernel, tmp_path):
    agent = tmp_path / "a.py"
    agent.write_text("from agentproc import ping\nping()\n")

    def ctl(*args):
        return subprocess.run([sys.executable, "-m", "agentproc.ctl", "--runtime-dir", str(kernel.runtime_dir),
                               *args], capture_output=True, text=True, timeout=60)

    run = ctl("run", "--trace", "--wait", str(agent))
    assert run.returncode == 0, run.stderr
    agent_id = max(p["id"] for p in kernel.client.call("proc.list")["procs"] if p["name"] == "a")
    shown = ctl("trace", str(agent_id))
    assert shown.returncode == 0 and "sys.ping" in shown.stdout and "proc.ready" in shown.stdout, shown
    saved = ctl("trace", str(agent_id), "--save", str(tmp_path / "t.json"))
    assert saved.returncode == 0, saved.stderr
    assert Trace.load(tmp_path / "t.json").calls[-1] == "sys.ping"
    assert json.loads((tmp_path / "t.json").read_text())["name"] == "a"
