"""The bridge to one MCP server: the program the kernel runs, sandboxed like a tool worker, for each process of
an ``[mcp.NAME]`` server (kernel/tools.py; docs/tools.md).

It starts the server as its child over stdio, in the same sandbox (which for these workers allows ``exec``),
and is its MCP client, with the official ``mcp`` package.  Agents never speak MCP and never see the server:
they call ``tool.call("NAME.TOOL", ...)``; the kernel checks the arguments against the tool's schema and
queues the call; this bridge takes it with ``tool.next``, calls the server, and hands back the result with
``tool.done``.  The MCP client runs here rather than in the kernel's own process so that whatever a server
sends (a malformed message, a huge one, a parser bug it trips) lands in this process, under its memory and CPU
limits, and never in the kernel.

``discover``: list the server's tools (``tool.register``) and exit; the kernel then starts the serving
bridges on demand, in the sandbox profile the tools' hints chose.
"""
from __future__ import annotations

import os
import sys

import anyio
import anyio.to_thread
import msgpack
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from agentproc.client import default

MAX_TEXT = 1 << 20  # characters of an error's text passed on
FRAME_SLACK = 1024  # bytes of a frame kept for the envelope


async def _main(spec: dict, discover: bool) -> int:
    client = default()
    params = StdioServerParameters(command=spec["command"][0], args=spec["command"][1:], env=spec["env"] or None,
                                   cwd=os.getcwd())
    async with stdio_client(params) as streams, ClientSession(*streams) as session:
        await session.initialize()
        room = client.call("proc.self")["max_frame"] - FRAME_SLACK  # what one syscall may carry
        if discover:
            _register(client, await _list_tools(session), room)
            return 0
        while True:
            job = await anyio.to_thread.run_sync(lambda: client.call("tool.next", timeout=None))
            answer, alive = await _call(session, job)
            size = len(msgpack.packb(answer, default=str))
            if size > room:
                answer = {"job": job["job"], "error": f"its result is {size} bytes, more than one syscall may carry "
                                                      f"({room}; [kernel] max_frame)"}
            client.call("tool.done", answer, timeout=60)
            if not alive:  # the server is gone: this bridge goes too, and the kernel starts a fresh pair
                return 1


def _register(client, tools: list[dict], room: int) -> None:
    """Hand the kernel the server's tools in frames that fit (``tool.register``, ``final`` on the last); a
    tool too large for one frame is left out, and said so."""
    batch, size, done, skipped = [], 0, [], []
    for i, tool in enumerate(tools):
        n = len(msgpack.packb(tool, default=str))
        if n > room // 2:
            skipped.append(f"{str(tool.get('name'))[:80]}: {n} bytes, more than a frame carries")
            continue
        if size + n > room // 2:
            done += client.call("tool.register", {"tools": batch, "final": False}, timeout=60)["tools"]
            batch, size = [], 0
        batch.append(tool)
        size += n
    answer = client.call("tool.register", {"tools": batch, "final": True}, timeout=60)
    done += answer["tools"]
    skipped += answer["skipped"]
    print(f"registered {len(done)} tools" + (f"; left out: {skipped}" if skipped else ""), flush=True)


async def _list_tools(session: ClientSession) -> list[dict]:
    """Every tool the server lists (following pages), as plain maps."""
    from mcp import types

    tools, cursor = [], None
    while True:
        page = await session.list_tools(params=types.PaginatedRequestParams(cursor=cursor) if cursor else None)
        for t in page.tools:
            tools.append({"name": t.name, "description": t.description or "", "input_schema": t.input_schema,
                          "output_schema": t.output_schema,
                          "annotations": t.annotations.model_dump(by_alias=True, exclude_none=True)
                          if t.annotations else {}})
        cursor = page.next_cursor
        if not cursor or len(tools) > 4096:
            return tools


async def _call(session: ClientSession, job: dict) -> tuple[dict, bool]:
    """(the ``tool.done`` answer for ``job``, whether the server is still there)."""
    from mcp.shared.exceptions import MCPError

    try:
        result = await session.call_tool(job["name"], job["args"])
    except MCPError as exc:
        closed = "closed" in str(exc).lower()
        return {"job": job["job"], "error": f"the MCP server {'exited' if closed else 'refused the call'}: "
                                           f"{exc}"[:MAX_TEXT]}, not closed
    except Exception as exc:  # noqa: BLE001 -- e.g. its stream broke: this call fails, a fresh bridge follows
        return {"job": job["job"], "error": f"{type(exc).__name__}: {exc}"[:MAX_TEXT]}, False
    content = [c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in result.content]
    if result.is_error:
        text = "\n".join(c.get("text", "") for c in content if c.get("type") == "text") or "the tool failed"
        return {"job": job["job"], "error": text[:MAX_TEXT]}, True
    return {"job": job["job"], "result": {"content": content, "structured": result.structured_content}}, True


def serve(spec: dict, discover: bool = False) -> None:
    """Bridge the server described by ``spec`` (``name``, ``command``, ``env``) until the kernel ends this
    process, the server exits, or (``discover``) its tools are registered.  A server that fails to start ends
    this process with one line on stderr saying so (the kernel shows it in ``tool.list``'s ``servers``)."""
    try:
        status = anyio.run(_main, spec, discover)
    except BaseException as exc:  # noqa: BLE001 -- anyio wraps everything in exception groups
        leaf = exc
        while isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:
            leaf = leaf.exceptions[0]
        if isinstance(leaf, (SystemExit, KeyboardInterrupt)):
            raise
        print(f"MCP server {spec['name']!r} ({' '.join(spec['command'])}): {type(leaf).__name__}: {leaf} "
              "(its own output above says why)", file=sys.stderr, flush=True)
        status = 2
    sys.exit(status)
