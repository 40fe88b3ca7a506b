"""The SDK client shared by threads and coroutines (agentproc/client.py): one connection, many requests in
flight, every answer to the request that asked -- with the real kernel, in the test process and in agents."""
from __future__ import annotations

import asyncio
import threading

import pytest

from agentproc.errors import EINVAL, ETIMEDOUT
from tests.helpers import agent_result


def test_threads_share_one_client(kernel):
    c = kernel.new_client()
    errors, answers = [], []

    def work(i: int):
        try:
            for j in range(40):
                r = c.call("storage.put", {"namespace": "clienttest", "key": f"client/t{i}/{j}", "data": f"{i}:{j}".encode()})
                got = c.call("storage.get", {"namespace": "clienttest", "key": f"client/t{i}/{j}"})
                answers.append(got["data"] == f"{i}:{j}".encode() and r["version"] >= 1)
        except Exception as exc:  # pragma: no cover - shown by the assertion below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    stream_text = []
    streamer = threading.Thread(target=lambda: stream_text.extend(
        ch["text"] for ch in c.stream("llm.generate", {"prompt": "Once upon a time", "max_tokens": 16})))
    for t in [*threads, streamer]:
        t.start()
    for t in [*threads, streamer]:
        t.join(60)
    assert not errors, errors
    assert len(answers) == 8 * 40 and all(answers)
    assert "".join(stream_text)


def test_coroutines_share_one_client_with_threads(kernel):
    c = kernel.new_client()

    async def main():
        pings = [c.acall("sys.ping") for _ in range(50)]
        gens = [c.acall("llm.generate", {"prompt": f"Count: {i},", "max_tokens": 6}) for i in range(3)]
        side = asyncio.to_thread(lambda: [c.call("sys.ping") for _ in range(50)])  # a thread, same client
        chunks = []
        async for ch in c.astream("llm.generate", {"prompt": "Hello", "max_tokens": 8}):
            chunks.append(ch["text"])
        return await asyncio.gather(*pings), await asyncio.gather(*gens), await side, chunks

    pings, gens, side, chunks = asyncio.run(main())
    assert len(pings) == 50 and len(side) == 50
    assert all(g["usage"]["completion_tokens"] == 6 for g in gens)
    assert len(chunks) > 1


def test_async_errors_and_timeouts(kernel):
    c = kernel.new_client()

    async def main():
        with pytest.raises(EINVAL):
            await c.acall("llm.generate", {"prompt": "x", "max_tokens": 0})
        with pytest.raises(ETIMEDOUT):  # a generation that cannot finish in 1 ms
            await c.acall("llm.generate", {"prompt": "Once", "max_tokens": 64}, timeout=0.001)
        return await c.acall("sys.ping")  # the connection still works

    assert asyncio.run(main())


def test_agent_has_three_requests_in_flight(kernel):
    rec, out = kernel.run("""
        import asyncio, json
        from agentproc import llm

        async def main():
            first = await asyncio.gather(*[llm.achat([{"role": "user", "content": f"Say {w}."}], max_tokens=6)
                                           for w in ("one", "two", "three")])
            pieces = []
            async for p in llm.achat([{"role": "user", "content": "Hello"}], stream=True, max_tokens=8):
                pieces.append(p)
            s = await llm.achat([{"role": "user", "content": "Hi"}], stream=True, max_tokens=4)
            assert "".join([p async for p in s]) == s.completion.text
            gen = await llm.agenerate("The capital of France is", max_tokens=4)
            return [a.text for a in first], pieces, gen.text

        texts, pieces, gen = asyncio.run(main())
        print("RESULT", json.dumps({"texts": texts, "pieces": pieces, "gen": gen, "models": llm.models()}))
    """)
    assert rec["exit_status"] == 0, out
    got = agent_result(out)
    assert len(got["texts"]) == 3 and all(got["texts"])
    assert len(got["pieces"]) > 1 and got["gen"]
    assert got["models"] == [{"name": "default", "default": True, "n_ctx_seq": 1024, "kind": "local"}]
