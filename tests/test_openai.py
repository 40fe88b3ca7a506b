"""Agents written for the official ``openai`` package, unmodified, inside the sandbox (agentproc/openai_api.py,
docs/sdk.md): real agent processes, the real kernel and model, no TCP socket and no key."""
from __future__ import annotations

import textwrap

import pytest

from tests.helpers import agent_result

pytest.importorskip("openai", reason="the openai package is not installed (it is a dependency: run make install)")


def test_chat_completion_unmodified(kernel):
    rec, out = kernel.run("""
        import json, socket
        from openai import OpenAI
        opened = []
        real = socket.socket.connect
        socket.socket.connect = lambda self, *a: opened.append(a) or real(self, *a)
        client = OpenAI()
        r = client.chat.completions.create(model="gpt-4o-mini", max_tokens=8, temperature=0,
            messages=[{"role": "system", "content": "You answer briefly."},
                      {"role": "user", "content": "What is the capital of France?"}])
        print("RESULT", json.dumps({"text": r.choices[0].message.content, "model": r.model,
              "finish": r.choices[0].finish_reason, "usage": r.usage.model_dump(), "opened": len(opened),
              "id": r.id}))
    """)
    assert rec["exit_status"] == 0, out
    got = agent_result(out)
    assert got["text"] and got["finish"] in ("stop", "length")
    assert got["model"] == "default"  # a name the kernel does not serve: its default model answers
    assert got["usage"]["completion_tokens"] <= 8 and got["usage"]["prompt_tokens"] > 10
    assert got["usage"]["total_tokens"] == got["usage"]["prompt_tokens"] + got["usage"]["completion_tokens"]
    assert got["opened"] == 0 and got["id"].startswith("chatcmpl-")


def test_stream_seed_stop_and_completions(kernel):
    rec, out = kernel.run("""
        import json
        from openai import OpenAI
        client = OpenAI()
        whole = client.completions.create(model="default", prompt="1, 2, 3, 4,", max_tokens=16, temperature=0)
        cut = client.completions.create(model="default", prompt="1, 2, 3, 4,", max_tokens=16, temperature=0,
                                        stop=" 7")
        pieces, finish, usage = [], None, None
        for ch in client.chat.completions.create(model="default", max_tokens=12, temperature=0.8, seed=7,
                stream=True, stream_options={"include_usage": True},
                messages=[{"role": "user", "content": "Name three colours."}]):
            if ch.choices:
                pieces.append(ch.choices[0].delta.content or "")
                finish = ch.choices[0].finish_reason or finish
            if ch.usage:
                usage = ch.usage.completion_tokens
        again = client.chat.completions.create(model="default", max_tokens=12, temperature=0.8, seed=7,
                messages=[{"role": "user", "content": "Name three colours."}])
        models = [m.id for m in client.models.list()]
        print("RESULT", json.dumps({"whole": whole.choices[0].text, "cut": cut.choices[0].text,
              "cut_finish": cut.choices[0].finish_reason, "streamed": "".join(pieces), "n": len(pieces),
              "finish": finish, "usage": usage, "again": again.choices[0].message.content, "models": models}))
    """)
    assert rec["exit_status"] == 0, out
    got = agent_result(out)
    assert " 7" in got["whole"] and got["cut"] == got["whole"][:got["whole"].index(" 7")]
    assert got["cut_finish"] == "stop"
    assert got["n"] > 2 and got["finish"] in ("stop", "length") and got["usage"] and got["usage"] <= 12
    assert got["streamed"] == got["again"]  # same seed, same text, streamed or not
    assert got["models"] == ["default"]


def test_tools_and_json_schema(kernel):
    rec, out = kernel.run("""
        import json
        from openai import OpenAI
        client = OpenAI()
        tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                  "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                                 "required": ["city"]}}}]
        msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
        r = client.chat.completions.create(model="default", messages=msgs, tools=tools, tool_choice="required",
                                           max_tokens=40, temperature=0)
        call = r.choices[0].message.tool_calls[0]
        msgs += [r.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
        final = client.chat.completions.create(model="default", messages=msgs, max_tokens=16, temperature=0)
        streamed = list(client.chat.completions.create(model="default", messages=msgs[:1], tools=tools,
                        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True,
                        max_tokens=40, temperature=0))
        delta_calls = [c for ch in streamed for c in (ch.choices[0].delta.tool_calls or []) if ch.choices]
        js = client.chat.completions.create(model="default", max_tokens=60, temperature=0,
            messages=[{"role": "user", "content": "Give a person as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object",
                "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
                "required": ["name", "age"], "additionalProperties": False}}})
        print("RESULT", json.dumps({"finish": r.choices[0].finish_reason, "name": call.function.name,
              "args": json.loads(call.function.arguments), "final": final.choices[0].message.content,
              "delta_calls": [c.function.name for c in delta_calls],
              "person": json.loads(js.choices[0].message.content)}))
    """, timeout=120)
    assert rec["exit_status"] == 0, out
    got = agent_result(out)
    assert got["finish"] == "tool_calls" and got["name"] == "get_weather"
    assert isinstance(got["args"]["city"], str)
    assert got["final"]
    assert got["delta_calls"] == ["get_weather"]
    assert set(got["person"]) == {"name", "age"} and isinstance(got["person"]["age"], int)


def test_errors_map_to_openai_exceptions(kernel):
    rec, out = kernel.run("""
        import json, openai
        from openai import OpenAI
        client = OpenAI(max_retries=0)
        seen = {}
        for name, kw in {
            "bad_temperature": dict(messages=[{"role": "user", "content": "hi"}], temperature=-1),
            "image": dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            "n": dict(messages=[{"role": "user", "content": "hi"}], n=2),
            "too_long": dict(messages=[{"role": "user", "content": "word " * 5000}]),
        }.items():
            try:
                client.chat.completions.create(model="default", max_tokens=4, **kw)
                seen[name] = "no error"
            except openai.APIStatusError as exc:
                seen[name] = [type(exc).__name__, exc.status_code]
        try:
            client.models.retrieve("nope")
        except openai.NotFoundError as exc:
            seen["model"] = exc.status_code
        print("RESULT", json.dumps(seen))
    """)
    assert rec["exit_status"] == 0, out
    got = agent_result(out)
    assert got["bad_temperature"] == ["BadRequestError", 400]
    assert got["image"] == ["BadRequestError", 400]
    assert got["n"] == ["BadRequestError", 400]
    assert got["too_long"] == ["BadRequestError", 400]
    assert got["model"] == 404


def test_quota_is_a_429_that_is_not_retried(kernel):
    source = textwrap.dedent("""
        import json, openai
        from openai import OpenAI
        client = OpenAI()
        client.chat.completions.create(model="default", max_tokens=64,
                                       messages=[{"role": "user", "content": "Tell me a story."}])
        try:
            client.chat.completions.create(model="default", max_tokens=4,
                                           messages=[{"role": "user", "content": "More."}])
            print("RESULT", json.dumps("no error"))
        except openai.RateLimitError as exc:
            print("RESULT", json.dumps([exc.status_code, exc.code]))
    """)
    pid = kernel.client.call("proc.spawn", {"source": source, "limits": {"llm_tokens": 40}})["id"]
    rec = kernel.wait(pid)
    out = kernel.output(pid)
    assert rec["exit_status"] == 0, out
    assert agent_result(out) == [429, "EDQUOT"]


def test_async_client_three_in_flight(kernel):
    rec, out = kernel.run("""
        import asyncio, json
        from openai import AsyncOpenAI

        async def main():
            client = AsyncOpenAI()
            asks = [client.chat.completions.create(model="default", max_tokens=8, temperature=0,
                    messages=[{"role": "user", "content": f"Say the number {i}."}]) for i in range(3)]
            answers = await asyncio.gather(*asks)
            pieces = []
            async for ch in await client.chat.completions.create(model="default", max_tokens=8, stream=True,
                    messages=[{"role": "user", "content": "Hello"}]):
                if ch.choices and ch.choices[0].delta.content:
                    pieces.append(ch.choices[0].delta.content)
            return [a.choices[0].message.content for a in answers], pieces

        texts, pieces = asyncio.run(main())
        print("RESULT", json.dumps({"texts": texts, "pieces": len(pieces)}))
    """)
    assert rec["exit_status"] == 0, out
    got = agent_result(out)
    assert len(got["texts"]) == 3 and all(got["texts"]) and got["pieces"] > 0


def test_langchain_chat_openai_unmodified(kernel):
    pytest.importorskip("langchain_openai", reason="langchain-openai is not installed (the test extra has it)")
    rec, out = kernel.run("""
        import json
        from langchain_openai import ChatOpenAI
        from langchain_core.messages import HumanMessage, SystemMessage
        llm = ChatOpenAI(model="gpt-4o-mini", max_tokens=8, temperature=0)
        r = llm.invoke([SystemMessage("Answer briefly."), HumanMessage("What is the capital of France?")])
        pieces = [ch.content for ch in llm.stream("Say hello.")]
        print("RESULT", json.dumps({"text": r.content, "tokens": r.usage_metadata["output_tokens"],
                                    "pieces": pieces}))
    """, timeout=120)
    assert rec["exit_status"] == 0, out
    got = agent_result(out)
    assert got["text"] and 0 < got["tokens"] <= 8
    assert "".join(got["pieces"])
