"""The tool manager through the real kernel, real agents and real tool workers (docs/abi.md, "Tools").
Attacks through tools are in tests/escape/test_tools.py."""
from __future__ import annotations

import pytest

from tests.helpers import agent_result

pytestmark = pytest.mark.timeout(120)

AGENT = """
import json
from agentproc import tools
from agentproc.errors import EINVAL, ENOENT, ETOOL
out = {"names": sorted(t["name"] for t in tools.list())}
out["calc"] = tools.call("calculator", expression="(17 * 23 + sqrt(16)) / 3")["value"]
out["text"] = tools.call("text", op="count", text="one two three\\nfour")
out["python"] = tools.call("python", code="import math\\nprint('side effect')\\nmath.factorial(10)")
out["clock"] = sorted(tools.call("clock"))
for name, call in [("bad_type", lambda: tools.call("calculator", expression=42)),
                   ("missing", lambda: tools.call("calculator")),
                   ("extra", lambda: tools.call("calculator", expression="1", evil=True)),
                   ("nested", lambda: tools.call("text", op="shout", text="x")),
                   ("unknown", lambda: tools.call("no-such-tool")),
                   ("unsafe", lambda: tools.call("calculator", expression="__import__('os').system('id')"))]:
    try:
        call()
        out[name] = "ran"
    except (EINVAL, ENOENT, ETOOL) as e:
        out[name] = f"{e.code}: {e.message}"
print("RESULT", json.dumps(out), flush=True)
"""


def test_builtin_tools_from_an_agent(kernel):
    rec, out = kernel.run(AGENT, name="tool-user")
    assert rec["exit_status"] == 0, out
    r = agent_result(out)
    assert r["names"] == ["calculator", "clock", "python", "storage", "text"]
    assert r["calc"] == pytest.approx(395 / 3)
    assert r["text"] == {"words": 4, "lines": 2, "characters": 18}
    assert r["python"]["result"] == "3628800" and r["python"]["stdout"] == "side effect\n"
    assert r["clock"] == ["iso", "unix"]
    assert r["bad_type"].startswith("EINVAL: args['expression']: 42 is not of type 'string'")
    assert r["missing"].startswith("EINVAL") and "'expression' is a required property" in r["missing"]
    assert r["extra"].startswith("EINVAL") and "evil" in r["extra"]
    assert r["nested"].startswith("EINVAL: args['op']")
    assert r["unknown"].startswith("ENOENT")
    assert r["unsafe"].startswith("ETOOL") and "not allowed" in r["unsafe"]


def test_one_caller_holds_at_most_a_quarter_of_a_tools_queue():
    """Unit test of the manager's queue (no workers start: spawn fails, so calls stay queued)."""
    from agentproc.errors import EAGAIN
    from kernel.tools import Pool, Tool, ToolManager

    def no_spawn(pool, discover=False):
        raise OSError("no workers in this test")

    class Caller:
        def __init__(self, proc):
            self.proc = proc

    class FakeCall:
        done = False

        def __init__(self, proc):
            self.caller = Caller(proc)

    tool = Tool("t", "test", {"type": "object"}, pool="t")
    tm = ToolManager({"t": tool}, {"t": Pool("t", instances=1, queue=8)}, no_spawn, lambda proc, why: None)
    hog, other = object(), object()
    for _ in range(2):
        tm.call(FakeCall(hog), "t", {})
    with pytest.raises(EAGAIN, match="a quarter"):
        tm.call(FakeCall(hog), "t", {})
    for _ in range(2):
        tm.call(FakeCall(other), "t", {})
    assert tm.stats()["t"]["queued"] == 4


def test_results_are_checked_against_a_declared_output_schema():
    """The kernel checks an MCP tool's structured content itself: the bridge shares the server's sandbox, so
    what it hands back is the server's word (the ``mcp`` client's own check is not enough)."""
    from kernel.tools import Tool, _output_error

    tool = Tool("s.t", "", {"type": "object"}, pool="s", remote="t",
                output={"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    assert _output_error(tool, {"content": [], "structured": {"n": 3}}) is None
    assert "result['n']: 'x' is not of type 'integer'" in _output_error(tool, {"structured": {"n": "x"}})
    assert "no structured content" in _output_error(tool, {"content": [], "structured": None})
