"""LLM syscalls (docs/abi.md 4: llm.generate, llm.chat) through real agent processes and the real model."""
from __future__ import annotations

import pytest

from agentproc.errors import E2BIG


def test_generate_from_an_agent(kernel):
    rec, out = kernel.run("""
        from agentproc import llm
        c = llm.generate("The capital of France is", max_tokens=8)
        print("TEXT", repr(c.text))
        print("REASON", c.finish_reason, c.usage["prompt_tokens"], c.usage["completion_tokens"])
    """)
    assert rec["exit_status"] == 0, out
    assert "REASON length 6 8" in out  # <bos> + 5 prompt tokens; max_tokens reached
    text = out.split("TEXT ", 1)[1].splitlines()[0]
    assert len(eval(text).strip()) > 0
    assert rec["usage"]["llm_tokens"] == 14


def test_stream_chunks_concatenate_to_result(kernel):
    c = kernel.client
    s = c.stream("llm.generate", {"prompt": "Once upon a time", "max_tokens": 20})
    chunks = [ch["text"] for ch in s]
    assert len(chunks) > 1
    assert "".join(chunks) == s.result["text"]
    plain = c.call("llm.generate", {"prompt": "Once upon a time", "max_tokens": 20})
    assert plain["text"] == s.result["text"]


def test_stop_sequence_truncates(kernel):
    c = kernel.client
    full = c.call("llm.generate", {"prompt": "1, 2, 3, 4,", "max_tokens": 16})["text"]
    assert " 7" in full, full  # the stop string below really occurs in the unconstrained output
    cut = c.call("llm.generate", {"prompt": "1, 2, 3, 4,", "max_tokens": 16, "stop": [" 7"]})
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == full[:full.index(" 7")]
    s = c.stream("llm.generate", {"prompt": "1, 2, 3, 4,", "max_tokens": 16, "stop": [" 7"]})
    assert "".join(ch["text"] for ch in s) == cut["text"]


def test_seeded_sampling_is_reproducible(kernel):
    args = {"prompt": "My favourite animal is", "max_tokens": 16, "temperature": 0.9, "seed": 1234}
    a = kernel.client.call("llm.generate", args)["text"]
    b = kernel.client.call("llm.generate", args)["text"]
    assert a == b


def test_chat_uses_the_model_template(kernel):
    rec, out = kernel.run("""
        from agentproc import llm
        c = llm.chat([{"role": "system", "content": "Answer briefly."},
                      {"role": "user", "content": "What is the capital of France?"}], max_tokens=16)
        print("REASON", c.finish_reason, c.usage["prompt_tokens"] > 10, repr(c.text))
        pieces = list(s := llm.chat([{"role": "user", "content": "Say hello."}], max_tokens=8, stream=True))
        print("STREAM", "".join(pieces) == s.completion.text)
    """)
    assert rec["exit_status"] == 0, out
    assert "REASON" in out and "True" in out.split("REASON")[1] and "STREAM True" in out


def test_prompt_too_long_is_e2big(kernel):
    with pytest.raises(E2BIG) as exc:
        kernel.client.call("llm.generate", {"prompt": "hello " * 2000, "max_tokens": 4})
    assert "context" in str(exc.value)
    assert kernel.client.call("sys.ping") == {"pong": True}


def test_killing_an_agent_cancels_its_generation(kernel):
    pid_ = kernel.spawn("""
        from agentproc import llm, ping
        ping()
        print("ready", flush=True)
        for t in llm.generate("Write a very long story:", max_tokens=900, stream=True):
            print(t, end="", flush=True)
    """)["id"]
    import time
    deadline = time.monotonic() + 60
    while len(kernel.output(pid_)) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    kernel.client.call("proc.kill", {"id": pid_})
    assert kernel.wait(pid_)["state"] == "KILLED"
    # the slot is free again: a short generation is answered promptly
    assert kernel.client.call("llm.generate", {"prompt": "Hi", "max_tokens": 2}, timeout=30)["usage"]
