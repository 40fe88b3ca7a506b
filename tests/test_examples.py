"""Every example agent (examples/README.md) runs as ``make run`` runs it -- all at once on one real kernel --
and ends well with its answer printed.  The ReAct agent has its own test (tests/test_react.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO

AGENTS = sorted(p for p in (REPO / "examples" / "agents").glob("*.py") if p.stem != "react")


def test_every_example_is_described():
    readme = (REPO / "examples" / "README.md").read_text()
    for p in [*AGENTS, REPO / "examples" / "agents" / "react.py"]:
        assert f"`agents/{p.name}`" in readme, f"examples/README.md does not describe {p.name}"


@pytest.mark.timeout(400)
def test_examples_run_together(kernel):
    ids = {kernel.spawn(p.read_text(), name=p.stem)["id"]: p.stem for p in AGENTS}
    outputs = {}
    for pid_, name in ids.items():
        rec = kernel.wait(pid_, timeout=300)
        outputs[name] = kernel.output(pid_)
        assert rec["exit_status"] == 0, (name, outputs[name])
        assert "answer:" in outputs[name], (name, outputs[name])
        answer = outputs[name].split("answer:", 1)[1].split("\ntokens:", 1)[0]  # code.py's spans lines
        assert answer.strip(), (name, outputs[name])
    assert "(model default)" in outputs["openai_chat"]
    assert outputs["async_fanout"].count(" / ") >= 4  # three questions, three answers
    review = outputs["reflection"].split("review: ", 1)[1].split(" | ", 1)[0]
    assert set(eval(review)) == {"missing", "score"}  # the JSON shape the critique was held to
    assert "grant" in outputs["researcher"] and "In short, the Moon" in outputs["writer"]
