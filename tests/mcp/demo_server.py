"""A small MCP server for the tests (the official ``mcp`` package's ``MCPServer``, stdio): the kernel runs it
as configured in ``[mcp.demo]``, sandboxed, and is its client (tests/test_mcp.py, tests/escape/test_tools.py).

Its tools cover what the kernel must handle: a read-only tool with structured output, one that crashes the
server, one that hangs, one without hints (destructive by MCP's defaults: it waits for an operator), and one
that reports what the sandbox lets it reach."""
from __future__ import annotations

import os
import socket
import sys
import time

from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations

app = MCPServer("demo")
READ_ONLY = ToolAnnotations(readOnlyHint=True, openWorldHint=False)
HARMLESS = ToolAnnotations(readOnlyHint=False, destructiveHint=False, openWorldHint=False)


@app.tool(annotations=READ_ONLY)
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@app.tool(annotations=HARMLESS)
def crash(status: int = 3) -> str:
    """Make the server exit at once."""
    os._exit(status)


@app.tool(annotations=READ_ONLY)
def sleep(seconds: float) -> str:
    """Sleep, then answer."""
    time.sleep(seconds)
    return "awake"


@app.tool()
def write_note(name: str, text: str) -> str:
    """Write a note into the server's scratch directory (no hints: destructive by default)."""
    with open(os.path.join(os.getcwd(), os.path.basename(name)), "w") as f:
        f.write(text)
    return f"wrote {len(text)} characters"


@app.tool(annotations=HARMLESS)
def probe(paths: list[str]) -> dict:
    """What the sandbox lets this server do: read each path, open a TCP socket, run a program."""
    out = {}
    for path in paths:
        try:
            with open(path, "rb") as f:
                out[path] = f"read {len(f.read(16))} bytes"
        except OSError as exc:
            out[path] = f"denied {exc.errno}"
    try:
        socket.create_connection(("127.0.0.1", 9), timeout=1).close()
        out["tcp"] = "connected"
    except OSError as exc:
        out["tcp"] = f"denied {exc.errno}"
    out["uid"] = os.getuid()
    out["pid"] = os.getpid()
    return out


if __name__ == "__main__":
    sys.stderr.write("demo MCP server starting\n")
    app.run()
