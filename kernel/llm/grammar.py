"""Bounds on what an agent's ``json_schema`` may make the kernel build (docs/abi.md 4, ``llm.generate``).

llama-cpp-python's converter turns a repetition bound (``maxLength: N``, ``maxItems: N``, ``{m,n}`` in a
``pattern``...) into a chain of ``N`` nested optional groups, and llama.cpp's grammar parser recurses once per
nesting level: ``maxLength`` 20000 overflows an 8 MiB stack (SIGSEGV, measured), and a value near 2**31 makes
the converter build a multi-GB string first.  So every schema is checked here *before* conversion -- size,
depth, repetition bounds, pattern length, enum sizes -- and the grammar text after it (length, nesting).
Measured: a grammar nested 1,000 deep parses on an 8 MiB stack; 1,500 to 8,000 deep llama.cpp refuses
cleanly; 20,000 deep it overflows.  The bounds keep every admitted grammar at the first of these.
"""
from __future__ import annotations

import json
import re

MAX_SCHEMA_BYTES = 16 << 10  # the schema as JSON
MAX_SCHEMA_DEPTH = 32  # nested maps and lists
MAX_REPEAT = 1000  # maxLength, minLength, maxItems, minItems, maxProperties, minProperties, {m,n} in patterns
MAX_PATTERN = 1024  # characters of one pattern
MAX_ENUM = 1024  # entries of one enum
MAX_GRAMMAR_BYTES = 512 << 10
MAX_GRAMMAR_NESTING = 1100  # parentheses open at once in the grammar text

REPEAT_KEYS = ("maxLength", "minLength", "maxItems", "minItems", "maxProperties", "minProperties",
               "maxContains", "minContains")
_QUANTIFIER = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


class SchemaError(ValueError):
    """The schema is outside the bounds; the message names the rule and where."""


def check_schema(schema) -> None:
    """Raise ``SchemaError`` naming the first bound ``schema`` breaks; return when it is within all of them."""
    try:
        size = len(json.dumps(schema, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as exc:
        raise SchemaError(f"json_schema is not plain JSON: {exc}") from None
    if size > MAX_SCHEMA_BYTES:
        raise SchemaError(f"json_schema is {size} bytes as JSON; the limit is {MAX_SCHEMA_BYTES}")
    stack = [(schema, "json_schema", 1)]
    while stack:
        node, where, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise SchemaError(f"{where}: json_schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(node, dict):
            for key, value in node.items():
                path = f"{where}.{key}"
                if key in REPEAT_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and abs(value) > MAX_REPEAT:
                    raise SchemaError(f"{path} is {value}; repetition bounds are limited to {MAX_REPEAT}")
                if key == "pattern" and isinstance(value, str):
                    _check_pattern(value, path)
                if key == "enum" and isinstance(value, list) and len(value) > MAX_ENUM:
                    raise SchemaError(f"{path} has {len(value)} entries; the limit is {MAX_ENUM}")
                stack.append((value, path, depth + 1))
        elif isinstance(node, list):
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(node))


def _check_pattern(pattern: str, where: str) -> None:
    if len(pattern) > MAX_PATTERN:
        raise SchemaError(f"{where} is {len(pattern)} characters; the limit is {MAX_PATTERN}")
    for m in _QUANTIFIER.finditer(pattern):
        for n in m.groups():
            if n and int(n) > MAX_REPEAT:
                raise SchemaError(f"{where}: repetition {m.group(0)} exceeds {MAX_REPEAT}")


def check_grammar(text: str) -> None:
    """Raise ``SchemaError`` if the grammar made from a schema is too long or nests too deeply to parse."""
    if len(text) > MAX_GRAMMAR_BYTES:
        raise SchemaError(f"json_schema makes a grammar of {len(text)} bytes; the limit is {MAX_GRAMMAR_BYTES}")
    depth = deepest = 0
    quoted = escaped = in_class = False
    for ch in text:  # parentheses outside "literals" and [classes]
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif quoted:
            quoted = ch != '"'
        elif in_class:
            in_class = ch != "]"
        elif ch == '"':
            quoted = True
        elif ch == "[":
            in_class = True
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
    if deepest > MAX_GRAMMAR_NESTING:
        raise SchemaError(f"json_schema makes a grammar nested {deepest} deep; the limit is {MAX_GRAMMAR_NESTING}")
