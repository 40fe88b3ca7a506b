"""The ReAct example (examples/agents/react.py) on the real default model, real tool workers and the real
kernel: the model's constrained tool calls reach the calculator and the Python runner, and the answers are
right.  Two of its questions, to keep the suite quick; `make run` asks all of them."""
from __future__ import annotations

from pathlib import Path

import pytest

from kernel.testing import TEST_CONFIG, KernelProc

pytestmark = pytest.mark.timeout(400)

REACT = Path(__file__).resolve().parent.parent / "examples" / "agents" / "react.py"


def test_the_react_agent_answers_correctly(tmp_path, model_path):
    k = KernelProc(tmp_path, TEST_CONFIG.replace("n_ctx_seq = 1024", "n_ctx_seq = 2048")
                   .replace("n_seq_max = 4", "n_seq_max = 8"))
    try:
        rec, out = k.run(REACT.read_text(), timeout=360, name="react",
                         argv=["A train travels 60 miles per hour for 7 hours. How many miles does it travel?",
                               "How many letters are in the word 'encyclopedia'?"])
    finally:
        k.stop()
    assert rec["exit_status"] == 0, out
    transcripts = [t for t in out.split("Question: ")[1:]]
    assert len(transcripts) == 2, out
    for transcript, expected in zip(transcripts, ("420", "12")):
        answer = transcript.split("Answer: ")[-1]
        assert "Action: " in transcript and f"Observation: {expected}" in transcript, out
        assert expected in answer, out
