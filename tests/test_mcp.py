"""MCP servers as tools, through the real kernel, real agents and a real MCP server (tests/mcp/demo_server.py,
written with the official ``mcp`` package) that the kernel starts sandboxed and speaks to as its client
(docs/tools.md, "MCP servers").  Hostile cases are in tests/escape/test_tools.py."""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from kernel.testing import TEST_CONFIG, KernelProc
from tests.helpers import agent_result, config_error

pytestmark = pytest.mark.timeout(180)

SERVER = Path(__file__).resolve().parent / "mcp" / "demo_server.py"
MCP_CONFIG = TEST_CONFIG + f"""
[access]
confirm_timeout_s = 20

[mcp.demo]
command = ["python", "{SERVER}"]
timeout_s = 4
instances = 2

[mcp.broken]
command = ["python", "-c", "import sys; sys.exit(7)"]
start_timeout_s = 10
"""


@pytest.fixture(scope="module")
def mcp_kernel(tmp_path_factory, model_path):
    config = MCP_CONFIG.replace("[access]", f'[access]\npath = "{tmp_path_factory.mktemp("mcp-access")}"')
    k = KernelProc(tmp_path_factory.mktemp("mcp-kernel"), config)
    yield k
    k.stop()


LISTER = """
import json
from agentproc.client import default
print("RESULT", json.dumps(default().call("tool.list")), flush=True)
"""


def test_an_mcp_servers_tools_are_listed_with_schemas_and_hints(mcp_kernel):
    rec, out = mcp_kernel.run(LISTER, name="lister")
    listing = agent_result(out)
    tools = {t["name"]: t for t in listing["tools"]}
    assert {"calculator", "demo.add", "demo.crash", "demo.sleep", "demo.write_note", "demo.probe"} <= set(tools)
    add = tools["demo.add"]
    assert add["server"] == "demo" and add["parameters"]["required"] == ["a", "b"]
    assert add["output"]["properties"]["result"]["type"] == "integer"
    assert add["hints"] == {"readOnlyHint": True, "openWorldHint": False} and add["confirm"] is False
    assert add["limits"]["instances"] == 2 and add["limits"]["timeout_s"] == 4
    assert tools["demo.write_note"]["confirm"] is True  # no hints: destructive by MCP's defaults
    assert tools["demo.crash"]["confirm"] is False       # destructiveHint = false
    servers = {s["name"]: s for s in listing["servers"]}
    assert servers["demo"]["state"] == "ready" and servers["demo"]["tools"] == 5
    broken = servers["broken"]
    assert broken["state"] == "failed" and "Connection closed" in broken["error"], broken


CALLER = """
import json
from agentproc import tools
from agentproc.errors import EINVAL, ENOENT, ETOOL, ETIMEDOUT
out = {"add": tools.call("demo.add", a=2, b=40)}
for name, call in [("bad", lambda: tools.call("demo.add", a="two", b=1)),
                   ("missing", lambda: tools.call("demo.add", a=1)),
                   ("crash", lambda: tools.call("demo.crash")),
                   ("after_crash", lambda: tools.call("demo.add", a=1, b=1)),
                   ("hang", lambda: tools.call("demo.sleep", seconds=30)),
                   ("after_hang", lambda: tools.call("demo.sleep", seconds=0)),
                   ("broken", lambda: tools.call("broken.anything"))]:
    try:
        out[name] = call()
    except (EINVAL, ENOENT, ETOOL, ETIMEDOUT) as e:
        out[name] = f"{e.code}: {e.message}"
print("RESULT", json.dumps(out), flush=True)
"""


def test_calls_validated_crashes_and_hangs_contained(mcp_kernel):
    rec, out = mcp_kernel.run(CALLER, name="mcp-caller", timeout=90)
    assert rec["exit_status"] == 0, out
    r = agent_result(out)
    assert r["add"]["structured"] == {"result": 42} and r["add"]["content"][0]["text"] == "42"
    assert r["bad"].startswith("EINVAL: args['a']: 'two' is not of type 'integer'"), r["bad"]
    assert r["missing"].startswith("EINVAL") and "'b' is a required property" in r["missing"]
    assert r["crash"].startswith("ETOOL") and "demo.crash" in r["crash"], r["crash"]
    assert r["after_crash"]["structured"] == {"result": 2}
    assert r["hang"].startswith("ETIMEDOUT") and "4 s" in r["hang"]
    assert r["after_hang"]["structured"] == {"result": "awake"}
    assert r["broken"].startswith("ENOENT") and "failed" in r["broken"], r["broken"]
    assert mcp_kernel.client.call("sys.ping")  # the kernel is fine


WRITER = """
from agentproc import tools
from agentproc.errors import EACCES
print("READY", flush=True)
for i in range(2):
    try:
        print("NOTE", i, tools.call("demo.write_note", name=f"n{i}", text="hello")["structured"]["result"], flush=True)
    except EACCES as e:
        print("NOTE", i, "DENIED", e.code, flush=True)
"""


def test_a_destructive_mcp_tool_waits_for_an_operator(mcp_kernel):
    k = mcp_kernel
    agent = k.spawn(WRITER, name="note-writer")["id"]

    def waiting() -> dict:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pending = [p for p in k.client.call("access.pending")["pending"] if "demo.write_note" in p["what"]]
            if pending:
                return pending[0]
            time.sleep(0.05)
        raise AssertionError(f"nothing waits for confirmation: {k.output(agent)}")

    first = waiting()
    assert "note-writer" in first["who"] and "not say this tool is read-only" in first["why"]
    k.client.call("access.decide", {"id": first["id"], "approve": True})
    second = waiting()
    k.client.call("access.decide", {"id": second["id"], "approve": False})
    rec = k.wait(agent, 60)
    out = k.output(agent)
    assert "NOTE 0 wrote 5 characters" in out and "NOTE 1 DENIED EACCES" in out, out
    assert rec["exit_status"] == 0


def test_twenty_callers_share_two_server_processes(mcp_kernel):
    """The server's ``instances`` (2) bound how many calls run at once; the rest wait their turn."""
    source = """
import time
from agentproc import tools
t0 = time.monotonic()
tools.call("demo.sleep", seconds=0.5)
print("TOOK", time.monotonic() - t0, flush=True)
"""
    ids = [mcp_kernel.spawn(source, name=f"sleeper{i}")["id"] for i in range(20)]
    peak = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ps = mcp_kernel.client.call("proc.list")["procs"]
        peak = max(peak, sum(1 for p in ps if p["name"] == "mcp-demo" and p["state"] == "RUNNING"))
        if all(mcp_kernel.record(i)["state"] in ("EXITED", "KILLED") for i in ids):
            break
        time.sleep(0.1)
    for i in ids:
        rec = mcp_kernel.wait(i, 30)
        assert rec["exit_status"] == 0, mcp_kernel.output(i)
    assert peak <= 2, peak
    took = sorted(float(mcp_kernel.output(i).split("TOOK")[1]) for i in ids)
    assert took[-1] >= 0.5 * 10 * 0.9, took  # 20 calls of 0.5 s through 2 at a time: the last waited ~5 s


@pytest.mark.parametrize("section, error", [
    ('[mcp.Bad]\ncommand = ["python"]', "lower-case"),
    ("[mcp.x]\nnetwork = true", "command"),
    ('[mcp.x]\ncommand = ["no-such-program-anywhere"]', "not found"),
    ('[mcp.x]\ncommand = ["python"]\nconfirm = "sometimes"', "confirm"),
    ('[mcp.x]\ncommand = ["python"]\ninstances = 0', "instances"),
    ('[mcp.x]\ncommand = ["python"]\nread = ["relative/path"]', "absolute"),
    ('[mcp.x]\ncommand = ["python"]\nenv = { A = 1 }', "env"),
    ('[mcp.x]\ncommand = ["python"]\n[groups.g]\nprivileges = ["tools"]\ntools = ["y.*"]', "unknown tools"),
])
def test_mcp_config_is_checked(tmp_path, section, error):
    config_error(tmp_path, section, error)


def test_a_group_may_name_an_mcp_servers_tools(tmp_path):
    from kernel.config import load

    path = tmp_path / "aiosd.toml"
    path.write_text(f'[mcp.demo]\ncommand = ["python", "{SERVER}"]\n[groups.g]\nprivileges = ["tools"]\n'
                    'tools = ["demo.*", "calculator"]\n')
    cfg = load(path)
    assert cfg.mcp["demo"].command == ["python", str(SERVER)] and cfg.mcp["demo"].confirm == "destructive"
    assert cfg.groups["g"].tools == frozenset({"demo.*", "calculator"})
