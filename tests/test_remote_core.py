"""kernel/llm/remote.py on its own, against a fake OpenAI-compatible server (an httpx mock transport): how the
concurrency budget is handed out, and how a server's answers map to ABI errors.  The real server, the kernel
and faults on the wire are tests/test_remote.py's."""
from __future__ import annotations

import asyncio
import json
import queue

import httpx
import pytest

from kernel.llm.remote import RemoteCore
from kernel.llm.request import SamplingParams

pytestmark = pytest.mark.timeout(60)


def completion(text: str = "ok", tokens: int = 3) -> dict:
    return {"choices": [{"text": text, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": tokens}}


def core_with(handler, **kw):
    """A started core whose requests ``handler`` (async, request -> response) answers; its events in a queue."""
    events: queue.Queue = queue.Queue()
    core = RemoteCore("r", lambda evs: [events.put(e) for e in evs], base_url="http://server/v1",
                      transport=httpx.MockTransport(handler), **kw)
    core.start()
    return core, events


def submit(core, prompt: str, owner, **kw):
    return core.enqueue(core.prepare(prompt, SamplingParams(max_tokens=3)), owner=owner, **kw)


def last_events(events, n: int) -> list:
    out = []
    while len(out) < n:
        req, kind, payload = events.get(timeout=20)
        if kind != "chunk":
            out.append((req, kind, payload))
    return out


@pytest.mark.parametrize("policy, order", [("fair", ["a1", "b1", "a2", "a3"]), ("fifo", ["a1", "a2", "a3", "b1"])])
def test_a_freed_place_goes_to_the_agent_served_least_not_the_first_come(policy, order):
    served = []

    async def handler(request):
        served.append(json.loads(request.content)["prompt"])
        await asyncio.sleep(0.05)
        return httpx.Response(200, json=completion())

    core, events = core_with(handler, concurrency=1, policy=policy)
    try:
        for prompt, owner in (("a1", "A"), ("a2", "A"), ("a3", "A"), ("b1", "B")):
            submit(core, prompt, owner)
        done = last_events(events, 4)
        assert all(kind == "done" for _, kind, _ in done)
        assert served == order
    finally:
        core.close()


def test_one_agent_holds_at_most_its_share_of_the_budget():
    in_flight, peak = {}, {}

    async def handler(request):
        owner = json.loads(request.content)["prompt"][0]
        in_flight[owner] = in_flight.get(owner, 0) + 1
        peak[owner] = max(peak.get(owner, 0), in_flight[owner])
        await asyncio.sleep(0.05)
        in_flight[owner] -= 1
        return httpx.Response(200, json=completion())

    core, events = core_with(handler, concurrency=4)  # agent_concurrency 0: half, 2
    try:
        for i in range(6):
            submit(core, f"a{i}", "A")
        submit(core, "b0", "B")
        last_events(events, 7)
        assert peak == {"a": 2, "b": 1}
    finally:
        core.close()


@pytest.mark.parametrize("status, body, code, words", [
    (404, {"error": {"message": "no such model"}}, "ENOTSUP", "no such model"),
    (400, {"error": {"message": "Requested tokens exceed context window"}}, "E2BIG", "context window"),
    (422, {"detail": "bad field"}, "EINVAL", "bad field"),
    (401, {"error": {"message": "invalid key"}}, "EIO", "api_key_file"),
    (503, {"error": {"message": "overloaded"}}, "EIO", "HTTP 503: overloaded"),
])
def test_server_answers_map_to_abi_errors(status, body, code, words):
    calls = []

    async def handler(request):
        calls.append(request)
        return httpx.Response(status, json=body)

    core, events = core_with(handler, retries=1)
    try:
        submit(core, "x", "A")
        [(_, kind, err)] = last_events(events, 1)
        assert kind == "error" and err.code == code and words in err.message, err
        assert len(calls) == (2 if status == 503 else 1)  # only 5xx (and 429) are tried again
        assert err.usage["completion_tokens"] == 0
    finally:
        core.close()


def test_usage_and_text_come_from_the_server_and_max_tokens_is_clamped():
    bodies = []

    async def handler(request):
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json=completion("Paris", 2))

    core, events = core_with(handler, send_top_k=False)
    try:
        core.enqueue(core.prepare("The capital", SamplingParams(max_tokens=100, seed=7, stop=["\n"])), owner="A",
                     max_tokens=10)
        [(_, kind, done)] = last_events(events, 1)
        assert done == {"text": "Paris", "finish_reason": "length",
                        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "cached_tokens": 0}}
        assert bodies[0]["max_tokens"] == 10 and bodies[0]["seed"] == 7 and bodies[0]["stop"] == ["\n"]
        assert "top_k" not in bodies[0]
    finally:
        core.close()
