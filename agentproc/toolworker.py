"""A tool worker: the program the kernel runs, sandboxed like an agent, to serve one tool (kernel/tools.py).

The worker asks the kernel for a job (``tool.next``: the answer comes when a caller's arguments, already
validated against the tool's schema, are queued), runs it, and hands back the result or the error
(``tool.done``).  Everything a tool does happens here, outside the kernel: a tool that crashes, loops or
allocates without end takes down this process only, and the kernel fails that one call and starts another
worker.  ``python`` workers serve one call each and exit, so no caller can leave anything behind for the next.

The built-in tools are plain functions of their arguments (``BUILTINS``); none uses ``eval`` on what a caller
sends except ``python``, whose whole point is to run it -- in this sandbox (no network, no exec, its own scratch
dir, memory, CPU and wall-time limits).
"""
from __future__ import annotations

import ast
import contextlib
import io
import math
import operator
import re
import sys
import time
import traceback

from agentproc.client import default

MAX_OUTPUT = 64 << 10  # characters of stdout / stderr a python call returns (the rest is cut, and said so)


# ---- calculator: a safe expression evaluator (numbers, + - * / // % **, parentheses, a few functions) ----

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"sqrt": math.sqrt, "log": math.log, "log10": math.log10, "exp": math.exp, "sin": math.sin,
              "cos": math.cos, "tan": math.tan, "abs": abs, "round": round, "min": min, "max": max,
              "floor": math.floor, "ceil": math.ceil}
_CONSTANTS = {"pi": math.pi, "e": math.e}
MAX_POWER = 10_000  # exponents beyond this are refused: 9**9**9 would take the worker's whole CPU limit


def calculate(expression: str) -> dict:
    """``{"value": number}`` of an arithmetic expression; ValueError naming what is not allowed."""
    tree = ast.parse(expression, mode="eval")

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.Name) and node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_POWER:
                raise ValueError(f"exponent {right} is too large (at most {MAX_POWER})")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS \
                and not node.keywords:
            return _FUNCTIONS[node.func.id](*[ev(a) for a in node.args])
        raise ValueError(f"not allowed in an expression: {ast.unparse(node)!r} (numbers, + - * / // % **, "
                         f"parentheses, {', '.join(sorted(_FUNCTIONS))}, pi, e)")

    return {"value": ev(tree)}


# ---- text utilities --------------------------------------------------------------------------------------

def text(op: str, text: str, pattern: str = "", replacement: str = "") -> dict:  # noqa: A002
    """Small text operations: count (words, lines, characters), upper, lower, replace, find (a regex)."""
    if op == "count":
        return {"words": len(text.split()), "lines": text.count("\n") + (1 if text else 0), "characters": len(text)}
    if op == "upper":
        return {"text": text.upper()}
    if op == "lower":
        return {"text": text.lower()}
    if op == "replace":
        return {"text": text.replace(pattern, replacement)}
    if op == "find":
        return {"matches": [m.group(0) for m in re.finditer(pattern, text)][:1000]}
    raise ValueError(f"unknown op {op!r}")


# ---- clock -----------------------------------------------------------------------------------------------

def clock(utc_offset_minutes: int = 0) -> dict:
    """The time now: unix seconds, and ISO 8601 at a UTC offset (time-zone names need the host's tz database,
    which the sandbox does not show)."""
    now = time.time()
    shifted = time.gmtime(now + utc_offset_minutes * 60)
    sign = "+" if utc_offset_minutes >= 0 else "-"
    offset = f"{sign}{abs(utc_offset_minutes) // 60:02d}:{abs(utc_offset_minutes) % 60:02d}"
    return {"unix": now, "iso": time.strftime("%Y-%m-%dT%H:%M:%S", shifted) + offset}


# ---- storage: the caller's own, with the caller's rights (the kernel maps this worker's storage syscalls
#      to the agent whose call it runs; kernel/sys_storage.py principal) ----------------------------------

def storage_tool(op: str, key: str = "", data: str = "", prefix: str = "") -> dict:
    """read / write / list in the calling agent's namespace."""
    from agentproc import storage
    if op == "read":
        value = storage.get(key)
        return {"key": key, "version": value.version, "text": value.data.decode("utf-8", "replace")}
    if op == "write":
        version = storage.put(key, data)
        return {"key": key, "version": version.version, "size": version.size}
    keys = []
    for entry in storage.list(prefix):
        keys.append(entry.key)
        if len(keys) >= 1000:
            break
    return {"keys": keys}


# ---- python ----------------------------------------------------------------------------------------------

def python(code: str) -> dict:
    """Run ``code``: ``{"stdout", "stderr", "result"}`` -- ``result`` is the repr of the last expression's value
    (None if the code does not end in one); an exception is reported in ``stderr`` with ``"error"`` set."""
    out, err = io.StringIO(), io.StringIO()
    result, error = None, None
    scope: dict = {"__name__": "__tool__"}
    try:
        tree = ast.parse(code, "<tool>", "exec")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            exec(compile(tree, "<tool>", "exec"), scope)  # noqa: S102 -- this tool's purpose, in its sandbox
            if last is not None:
                value = eval(compile(ast.Expression(last.value), "<tool>", "eval"), scope)  # noqa: S307
                result = None if value is None else repr(value)[:MAX_OUTPUT]
    except BaseException as exc:  # noqa: BLE001 -- the caller's code failing is its result
        error = f"{type(exc).__name__}: {exc}"
        err.write("".join(traceback.format_exception(exc))[-MAX_OUTPUT:])
    return {"stdout": out.getvalue()[:MAX_OUTPUT], "stderr": err.getvalue()[:MAX_OUTPUT], "result": result,
            "error": error}


BUILTINS = {"calculator": calculate, "text": text, "clock": clock, "storage": storage_tool, "python": python}


def serve(tool: str, once: bool = False) -> None:
    """Serve ``tool`` until the kernel ends this process (or after one call when ``once``)."""
    fn = BUILTINS[tool]
    client = default()
    while True:
        job = client.call("tool.next", timeout=None)
        try:
            answer = {"job": job["job"], "result": fn(**job["args"])}
        except Exception as exc:  # noqa: BLE001 -- the tool's failure is its caller's answer
            answer = {"job": job["job"], "error": f"{type(exc).__name__}: {exc}"}
        client.call("tool.done", answer, timeout=60)
        if once:
            return


if __name__ == "__main__":
    serve(sys.argv[1], once="--once" in sys.argv)
