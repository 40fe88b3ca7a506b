"""Tool calls from the model (docs/abi.md, llm.chat; kernel/toolcalls.py): on the real model through a real agent
the arguments always parse and match the tool's schema; the planning and shaping rules without a model."""
from __future__ import annotations

import json

import jsonschema
import pytest

from kernel import toolcalls
from kernel.tools import BUILTIN_TOOLS
from tests.helpers import agent_result

pytestmark = pytest.mark.timeout(180)

AGENT = """
import json
from agentproc import llm, tools
from agentproc.errors import SyscallError
out = {"calls": []}
for question, offered, choice in [("What is 17 times 23?", ["calculator", "python"], "required"),
                                  ("Count the words in 'to be or not to be'.", ["text"], {"name": "text"}),
                                  ("Say hello.", ["calculator"], "auto")]:
    r = llm.chat([{"role": "user", "content": question}], tools=offered, tool_choice=choice, max_tokens=160)
    out["calls"].append({"finish": r.finish_reason, "text": r.text, "tool_calls": r.tool_calls})
    for tc in r.tool_calls:  # run it as a ReAct agent would (the model may well get the arithmetic wrong)
        try:
            tools.call(tc["function"]["name"], **json.loads(tc["function"]["arguments"]))
        except SyscallError as e:
            assert e.code == "ETOOL", e  # never EINVAL: the grammar kept the arguments to the schema
try:
    llm.chat([{"role": "user", "content": "x"}], tools=["calculator"], json_schema={"type": "object"})
except SyscallError as e:
    out["both"] = e.code
print("RESULT", json.dumps(out), flush=True)
"""


def test_tool_calls_from_the_real_model_match_their_schemas(kernel):
    rec, out = kernel.run(AGENT, name="tool-chatter", timeout=150)
    assert rec["exit_status"] == 0, out
    r = agent_result(out)
    assert r["both"] == "EINVAL"
    first, second, third = r["calls"]
    for answer, allowed in ((first, {"calculator", "python"}), (second, {"text"})):
        # A tool call, unless the model's arguments ran past max_tokens ("length": no call is made of them).
        assert answer["finish"] in ("tool_calls", "length"), answer
        for tc in answer["tool_calls"]:
            assert tc["type"] == "function" and tc["id"].startswith("call_") and tc["function"]["name"] in allowed
            args = json.loads(tc["function"]["arguments"])
            jsonschema.validate(args, BUILTIN_TOOLS[tc["function"]["name"]].parameters)
    assert first["tool_calls"] or second["tool_calls"], r
    assert third["finish"] in ("tool_calls", "stop", "length")
    assert bool(third["tool_calls"]) == (third["finish"] == "tool_calls")


def test_planning_rules():
    own = {"name": "locate", "description": "a city", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 500}}, "required": ["city"]}}
    schema, system, specs = toolcalls.plan(BUILTIN_TOOLS, None, ["calculator", own], "required")
    assert set(specs) == {"calculator", "locate"} and "locate" in system and len(schema["anyOf"]) == 2
    assert "maxLength" not in json.dumps(schema)  # long bounds leave the grammar; shape() checks them
    schema, _, _ = toolcalls.plan(BUILTIN_TOOLS, None, ["calculator", own], {"name": "locate"})
    assert schema["properties"]["name"] == {"const": "locate"}
    schema, _, _ = toolcalls.plan(BUILTIN_TOOLS, None, ["calculator"], "auto")
    assert {"content"} in [set(o["properties"]) for o in schema["anyOf"]]
    assert toolcalls.plan(BUILTIN_TOOLS, None, ["calculator"], "none") == (None, None, {})
    for tools, choice in ((["nope"], None), ([], None), (["calculator"], "maybe"), (["calculator"], {"name": "x"}),
                          (["calculator", "calculator"], None), ([{"name": "x", "parameters": {"type": 5}}], None)):
        with pytest.raises(Exception) as err:
            toolcalls.plan(BUILTIN_TOOLS, None, tools, choice)
        assert err.value.code in ("EINVAL", "ENOENT"), (tools, choice)
    with pytest.raises(Exception) as err:
        toolcalls.plan(BUILTIN_TOOLS, frozenset({"text"}), ["calculator"], None)
    assert err.value.code == "EPERM"


def test_shaping_rules():
    specs = {"locate": {"name": "locate", "description": "", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 5}}, "required": ["city"]}}}
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "cached_tokens": 0}
    ok = toolcalls.shape({"text": '{"name": "locate", "arguments": {"city": "Paris"}}', "finish_reason": "stop",
                          "usage": usage}, specs, "call_7")
    assert ok["finish_reason"] == "tool_calls" and ok["tool_calls"][0]["function"] == {
        "name": "locate", "arguments": '{"city": "Paris"}'} and ok["text"] == ""
    long = toolcalls.shape({"text": '{"name": "locate", "arguments": {"city": "Paris, France"}}',
                            "finish_reason": "stop", "usage": usage}, specs, "call_8")
    assert long["finish_reason"] == "length" and not long["tool_calls"] and "schema" in long["error"]
    cut = toolcalls.shape({"text": '{"name": "loc', "finish_reason": "length", "usage": usage}, specs, "c")
    assert cut["finish_reason"] == "length" and cut["tool_calls"] == []
    text = toolcalls.shape({"text": '{"content": "hello"}', "finish_reason": "stop", "usage": usage}, specs, "c")
    assert text["text"] == "hello" and text["tool_calls"] == [] and text["finish_reason"] == "stop"
