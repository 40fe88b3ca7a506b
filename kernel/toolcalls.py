"""Tool calls from the model: ``llm.chat(messages, tools=..., tool_choice=...)`` (docs/abi.md, ``llm.chat``).

The model is constrained, by a grammar made from one JSON schema (the engine's ``json_schema`` path), to answer
with exactly one JSON object: ``{"name": <a tool>, "arguments": <that tool's parameters>}`` -- or, with
``tool_choice: "auto"``, also ``{"content": <text>}``.  So the arguments always parse and have the tool's
shape, even from a small base model; they are checked against the tool's full schema afterwards (the grammar
leaves out string length bounds over ``MAX_GRAMMAR_LENGTH``, which would make it thousands of rules deep).
The answer is turned into OpenAI-shaped ``tool_calls``.

Flow: ``plan`` (on the event loop, in the handler) -> the usual LLM path with the schema and a system message
describing the tools -> ``shape`` (when the generation is done).
"""
from __future__ import annotations

import copy
import json

import jsonschema

from kernel.tools import permits
from syscalls.errors import EINVAL, ENOENT, EPERM

MAX_GRAMMAR_LENGTH = 64  # string length bounds up to this stay in the grammar; larger ones are checked after
MAX_TOOLS = 32


def plan(available: dict, allowed, tools: list, choice) -> tuple[dict | None, str | None, dict]:
    """``(json_schema, system_message, specs by name)`` for the tools a chat offers (``(None, None, {})`` when
    ``choice`` is ``"none"``).  ``available``: the tool manager's tools by name; ``allowed``: the caller's
    group's tools (None: all); ``tools``: names of those, or ``{"name", "description", "parameters"}`` maps of
    the caller's own (they run nowhere: the caller gets the call back and does what it likes with it).
    EINVAL / ENOENT / EPERM naming the problem."""
    if not tools or len(tools) > MAX_TOOLS:
        raise EINVAL(f"tools must list 1..{MAX_TOOLS} tools (names from tool.list, or {{name, description, "
                     "parameters}} maps)")
    specs: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        spec = _spec(available, allowed, tool, i)
        if spec["name"] in specs:
            raise EINVAL(f"tools[{i}]: {spec['name']!r} is listed twice")
        specs[spec["name"]] = spec
    if choice == "none":
        return None, None, {}
    if isinstance(choice, dict):
        name = choice.get("name")
        if name not in specs:
            raise EINVAL(f"tool_choice names {name!r}, which is not in tools")
        offered = [specs[name]]
    elif choice in (None, "required", "auto"):
        offered = list(specs.values())
    else:
        raise EINVAL('tool_choice must be "auto", "required", "none" or {"name": TOOL}')
    options = [{"type": "object", "properties": {"name": {"const": s["name"]}, "arguments": _grammar_safe(
        s["parameters"])}, "required": ["name", "arguments"], "additionalProperties": False} for s in offered]
    if choice == "auto":
        options.append({"type": "object", "properties": {"content": {"type": "string"}}, "required": ["content"],
                        "additionalProperties": False})
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    lines = ["You can call tools. Answer with one JSON object: "
             + ('{"name": TOOL, "arguments": {...}}' if choice != "auto" else
                '{"name": TOOL, "arguments": {...}} to call a tool, or {"content": "..."} to answer directly')
             + ". Tools:"]
    for s in offered:
        lines.append(f"- {s['name']}: {s['description']} Arguments (JSON Schema): "
                     f"{json.dumps(s['parameters'], separators=(',', ':'))}")
    return schema, "\n".join(lines), specs


def shape(result: dict, specs: dict, call_id: str) -> dict:
    """The engine's finished result (its text is the constrained JSON) as an OpenAI-shaped answer: ``text``
    (empty for a tool call), ``finish_reason`` ("tool_calls" when it is one), ``tool_calls``."""
    out = dict(result, tool_calls=[])
    try:
        obj = json.loads(result["text"])
    except ValueError:  # cut off by max_tokens: no call to make
        out["finish_reason"] = "length"
        return out
    if "content" in obj:
        out["text"] = obj["content"]
        return out
    spec = specs.get(obj.get("name"))
    if spec is None:
        out["finish_reason"] = "length"
        return out
    errors = sorted(jsonschema.Draft202012Validator(spec["parameters"]).iter_errors(obj["arguments"]), key=str)
    if errors:  # only the length bounds the grammar left out can fail here
        out["finish_reason"] = "length"
        out["error"] = f"the model's arguments break the tool's schema: {errors[0].message}"
        return out
    out.update(text="", finish_reason="tool_calls", tool_calls=[{
        "id": call_id, "type": "function",
        "function": {"name": spec["name"], "arguments": json.dumps(obj["arguments"], ensure_ascii=False)}}])
    return out


def _spec(available: dict, allowed, tool, i: int) -> dict:
    if isinstance(tool, str):
        if tool not in available:
            raise ENOENT(f"tools[{i}]: no tool {tool!r} (tool.list shows them)")
        if not permits(allowed, tool):
            raise EPERM(f"tools[{i}]: your group may not call tool {tool!r}")
        t = available[tool]
        return {"name": t.name, "description": t.description, "parameters": t.parameters}
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"] \
            or not isinstance(tool.get("parameters", {}), dict):
        raise EINVAL(f"tools[{i}]: a tool is a name, or a map with name (str), description (str) and parameters "
                     "(a JSON Schema map)")
    extra = set(tool) - {"name", "description", "parameters"}
    if extra:
        raise EINVAL(f"tools[{i}]: unknown keys {sorted(extra)}")
    try:
        jsonschema.Draft202012Validator.check_schema(tool.get("parameters", {}))
    except jsonschema.SchemaError as exc:
        raise EINVAL(f"tools[{i}].parameters is not a JSON Schema: {exc.message}") from None
    return {"name": tool["name"][:64], "description": str(tool.get("description", ""))[:1024],
            "parameters": tool.get("parameters", {"type": "object"})}


def _grammar_safe(schema: dict) -> dict:
    """``schema`` without string length bounds over ``MAX_GRAMMAR_LENGTH`` (checked after generation instead)."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key in ("maxLength", "minLength"):
                if isinstance(node.get(key), int) and node[key] > MAX_GRAMMAR_LENGTH:
                    del node[key]
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return schema
