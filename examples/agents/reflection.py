"""Reflection: draft an answer, critique it, revise it -- three calls, each fed the previous output.  The critique
is constrained to a small JSON shape (``json_schema``), so even the base model returns something usable."""
import json

from agentproc import llm

task = "Write one sentence describing the Moon."
draft = llm.generate(f"Task: {task}\nSentence:", max_tokens=32, stop=["\n"], temperature=0)
critique = llm.generate(
    f"Task: {task}\nSentence:{draft.text}\nA reviewer names one missing fact and gives a score out of 10.\n"
    "Review as JSON:", max_tokens=48, temperature=0,
    json_schema={"type": "object", "properties": {"missing": {"type": "string", "maxLength": 60},
                                                  "score": {"type": "integer", "minimum": 0, "maximum": 10}},
                 "required": ["missing", "score"], "additionalProperties": False})
review = json.loads(critique.text)
revised = llm.generate(f"Task: {task}\nFirst try:{draft.text}\nMissing: {review['missing']}\n"
                       "Improved sentence:", max_tokens=40, stop=["\n"], temperature=0)
print("prompt:", task)
print("answer:", f"draft: {draft.text.strip()} | review: {review} | revised: {revised.text.strip()}")
print("tokens:", sum(c.usage["completion_tokens"] for c in (draft, critique, revised)))
