"""Helpers shared by the tests (as Trio's ``tutil``): what several test files need, in one place."""
from __future__ import annotations

import json


def agent_result(output: str) -> dict:
    """The JSON an agent printed on its last ``RESULT {...}`` line (the test fails, showing the output, if
    there is none)."""
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, output
    return json.loads(lines[-1][len("RESULT "):])
