"""A ReAct agent on the default model: it reasons by acting -- each step the model either calls a tool (the
calculator or the Python runner, its arguments constrained by a grammar from the tools' schemas) or answers;
tool results go back into the conversation until it answers.

The default model is a 270M *base* model: it follows examples, not instructions.  So the conversation opens
with a few worked examples (question -> tool call -> result -> answer) and the model continues the pattern;
the grammar guarantees every step is a well-formed call or answer.  Run it with ``aiosctl run`` or
``make run``; pass questions as arguments to ask your own.
"""
import collections
import json
import re
import sys

from agentproc import llm, tools
from agentproc.errors import SyscallError

MAX_STEPS = 4
CANDIDATES = 8  # answers proposed at each step, one greedy and the rest sampled: the agent acts on a vote
# The tools as the model sees them: the real ones' schemas narrowed by patterns, so that the grammar ends every
# argument within a line (a small model left free writes code until max_tokens) and keeps JSON's braces and
# quotes out of code (a small model closes the JSON object inside the string).  The calls go to the real tools,
# whose own schemas allow more.
TOOLS = [
    {"name": "calculator", "description": "Evaluate an arithmetic expression.",
     "parameters": {"type": "object", "properties": {"expression": {"type": "string",
                                                                     "pattern": "^[0-9a-z+*/(). ,-]{1,48}$"}},
                    "required": ["expression"], "additionalProperties": False}},
    {"name": "python", "description": "Run one line of Python; returns the value of the expression.",
     "parameters": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[^{}\"\\\\]{1,64}$"}},
                    "required": ["code"], "additionalProperties": False}},
]

# Worked examples (none of them is one of the questions below).  Each step is one JSON object: a tool call,
# or {"content": answer}; one example shows a failed call followed by a better one.  A question gets the
# SHOWN examples most like it, the closest last: a small base model copies the example it saw last.
EXAMPLES = [
    ("What is 12 times 9?", [("calculator", {"expression": "12 * 9"}, "108")], "The answer is 108."),
    ("A car drives 40 miles per hour for 3 hours. How many miles does it drive?",
     [("calculator", {"expression": "40 * 3"}, "120")], "The answer is 120."),
    ("A shop sells 25 apples a day. How many apples does it sell in 6 days?",
     [("calculator", {"expression": "25 * 6"}, "150")], "The answer is 150."),
    ("How many letters are in the word 'banana'?", [("python", {"code": "len('banana')"}, "6")],
     "The answer is 6."),
    ("What is the sum of the numbers from 1 to 10?", [("python", {"code": "sum(range(1, 10 + 1))"}, "55")],
     "The answer is 55."),
    ("What is the average of 4, 8 and 12?",
     [("python", {"code": "mean(4, 8, 12)"}, "error: NameError: name 'mean' is not defined"),
      ("python", {"code": "sum([4, 8, 12]) / 3"}, "8.0")], "The answer is 8."),
    ("How many of the numbers 5, 10, 12, 13, 20 are even?",
     [("python", {"code": "len([n for n in [5, 10, 12, 13, 20] if n % 2 == 0])"}, "3")], "The answer is 3."),
    ("What is the largest of 17, 4 and 23?", [("python", {"code": "max([17, 4, 23])"}, "23")],
     "The answer is 23."),
]
SHOWN = 3

QUESTIONS = [
    "What is 17 times 23?",
    "A train travels 60 miles per hour for 7 hours. How many miles does it travel?",
    "How many letters are in the word 'encyclopedia'?",
    "How many of the numbers 3, 8, 15, 22 are even?",
    "What is the largest of 31, 8, 76 and 45?",
]


def call_json(name: str, args: dict) -> str:
    return json.dumps({"name": name, "arguments": args})


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def opening(question: str) -> list[dict]:
    """The ``SHOWN`` worked examples most like ``question`` (shared words), as a conversation, closest last."""
    mine = words(question)
    ranked = sorted(EXAMPLES, key=lambda ex: len(mine & words(ex[0])) / len(mine | words(ex[0])))
    messages = []
    for question, steps, answer in ranked[-SHOWN:]:
        messages.append({"role": "user", "content": question})
        for tool, args, result in steps:
            messages += [{"role": "assistant", "content": call_json(tool, args)},
                         {"role": "user", "content": f"Result: {result}"}]
        messages.append({"role": "assistant", "content": json.dumps({"content": answer})})
    return messages


def run_tool(name: str, args: dict) -> str:
    """The tool's result as the short text the model reads."""
    try:
        out = tools.call(name, args)
    except SyscallError as exc:
        return f"error: {exc.message[:200]}"
    if name == "calculator":
        value = out["value"]
        return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    if out.get("error"):
        return f"error: {out['error']}"
    return (out.get("result") or out.get("stdout", "")).strip()[:200]


def propose(messages: list[dict], must_act: bool) -> list:
    """``CANDIDATES`` answers to the conversation, sent at once (the kernel decodes them in one batch): one
    greedy, the others sampled with fixed seeds."""
    choice = "required" if must_act else "auto"
    requests = [{"messages": messages, "tools": TOOLS, "tool_choice": choice, "max_tokens": 96,
                 "temperature": 0.0 if i == 0 else 0.8, "seed": i} for i in range(CANDIDATES)]
    return [r for r in llm.chat_all(requests) if not isinstance(r, Exception) and r.finish_reason != "length"]


def act(replies: list) -> tuple[str, dict, str] | None:
    """Self-consistency: run each distinct tool call the candidates propose, and keep the one whose result
    most candidates reached (errors count last).  None if no candidate called a tool."""
    calls = [(r.tool_calls[0]["function"]["name"], r.tool_calls[0]["function"]["arguments"])
             for r in replies if r.tool_calls]
    if not calls:
        return None
    results = {call: run_tool(call[0], json.loads(call[1])) for call in dict.fromkeys(calls)}
    votes = collections.Counter(results[c] for c in calls if not results[c].startswith("error"))
    if votes:
        best = votes.most_common(1)[0][0]
        name, arguments = next(c for c in calls if results[c] == best)
    else:
        name, arguments = calls[0]
    return name, json.loads(arguments), results[(name, arguments)]


def solve(question: str) -> tuple[str, list[str]]:
    """(the answer, the transcript) of one question."""
    messages = opening(question) + [{"role": "user", "content": question}]
    transcript = [f"Question: {question}"]
    for step in range(MAX_STEPS):
        must_act = step == 0 or transcript[-1].startswith("Observation: error")
        replies = propose(messages, must_act)
        action = act(replies)
        if action is None:
            answer = replies[0].text if replies else "(no answer)"
            transcript.append(f"Answer: {answer}")
            return answer, transcript
        name, args, result = action
        transcript.append(f"Action: {name}({json.dumps(args)})")
        transcript.append(f"Observation: {result}")
        messages += [{"role": "assistant", "content": call_json(name, args)},
                     {"role": "user", "content": f"Result: {result}"}]
    transcript.append("Answer: (no answer within the step limit)")
    return "", transcript


def main(questions: list[str]) -> None:
    for question in questions:
        answer, transcript = solve(question)
        print("\n".join(transcript), flush=True)
        print(flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or QUESTIONS)
