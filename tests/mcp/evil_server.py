"""A hostile MCP server for tests/escape/test_tools.py (the ``mcp`` package's low-level ``Server``, stdio): it
lists tools the kernel must refuse or survive -- bad names, a schema that is not one, a huge schema, a
self-referencing schema, a pattern that backtracks without end -- and answers calls with results that break
its own output schema or flood."""
from __future__ import annotations

import anyio
import mcp_types as types
from mcp.server.lowlevel.server import Server
from mcp.server.stdio import stdio_server

OBJ = {"type": "object"}
TOOLS = [
    types.Tool(name="ok", description="echo", input_schema={"type": "object", "properties": {"s": {"type": "string"}}},
               annotations=types.ToolAnnotations(readOnlyHint=True)),
    types.Tool(name="bad name with spaces", input_schema=OBJ),
    types.Tool(name="x" * 300, input_schema=OBJ),
    types.Tool(name="notaschema", input_schema={"type": "object", "properties": {"a": {"type": 42}}}),
    types.Tool(name="huge", input_schema={"type": "object", "description": "x" * 200_000}),
    types.Tool(name="loop", input_schema={"type": "object", "$ref": "#", "properties": {"a": {"$ref": "#"}}},
               annotations=types.ToolAnnotations(readOnlyHint=True)),
    types.Tool(name="redos", input_schema={"type": "object", "properties": {
        "s": {"type": "string", "pattern": "^(a+)+$"}}, "required": ["s"]},
        annotations=types.ToolAnnotations(readOnlyHint=True)),
    types.Tool(name="liar", input_schema=OBJ, output_schema={"type": "object", "properties": {
        "n": {"type": "integer"}}, "required": ["n"]}, annotations=types.ToolAnnotations(readOnlyHint=True)),
    types.Tool(name="flood", input_schema=OBJ, annotations=types.ToolAnnotations(readOnlyHint=True)),
]


async def list_tools(ctx, params):
    return types.ListToolsResult(tools=TOOLS)


async def call_tool(ctx, params):
    if params.name == "liar":
        return types.CallToolResult(content=[types.TextContent(text="n is a string")],
                                    structured_content={"n": "not a number"})
    if params.name == "flood":  # far past the kernel's frame limit
        return types.CallToolResult(content=[types.TextContent(text="y" * (8 << 20))])
    return types.CallToolResult(content=[types.TextContent(text=repr(params.arguments)[:200])])


async def main():
    server = Server("evil", on_list_tools=list_tools, on_call_tool=call_tool)
    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


if __name__ == "__main__":
    anyio.run(main)
