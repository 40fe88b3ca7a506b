"""Remote LLM cores (docs/remote.md): ``[models.NAME] kind = "openai"`` served through the same syscalls, against
llama-cpp-python's own OpenAI-compatible server on the embedded model, behind a fault-injecting relay
(tests/helpers.py ``FaultProxy``) that makes it slow, answer 500, vanish or die mid-stream."""
from __future__ import annotations

import json
import time

import pytest

from agentproc.errors import ECANCELED, EIO, ENOTSUP
from kernel.testing import TEST_CONFIG, FaultProxy, KernelProc, LlamaServer
from tests.helpers import agent_result

pytestmark = pytest.mark.timeout(180)

REMOTE_CONFIG = TEST_CONFIG + """
[models.remote]
kind = "openai"
base_url = "{url}"
api_key_file = "{key}"
concurrency = 2
response_format = "json_object"
timeout_s = 4
retries = 1
breaker_failures = 3
breaker_s = 2

[models.plain]
kind = "openai"
base_url = "{url}"
model = "gemma"
response_format = "none"
completions = false
"""


@pytest.fixture(scope="module")
def server(model_path):
    s = LlamaServer(model_path)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def proxy(server):
    p = FaultProxy(server.port)
    yield p
    p.close()


@pytest.fixture(scope="module")
def rkernel(tmp_path_factory, proxy):
    tmp = tmp_path_factory.mktemp("remote")
    key = tmp / "api.key"
    key.write_text("sk-test-remote-key\n")
    key.chmod(0o600)
    k = KernelProc(tmp, REMOTE_CONFIG.format(url=proxy.base_url, key=key))
    yield k
    k.stop()


@pytest.fixture(autouse=True)
def healthy(proxy, rkernel):
    """Every test starts with a relaying proxy and a closed circuit breaker."""
    proxy.mode = "pass"
    deadline = time.monotonic() + 10
    while rkernel.client.call("sys.status")["llm"]["remote"]["breaker"] == "open":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    yield
    proxy.mode = "pass"


def remote_stats(k) -> dict:
    return k.client.call("sys.status")["llm"]["remote"]


def test_models_lists_the_remote_core_without_its_address(rkernel, proxy):
    models = rkernel.client.call("llm.models")["models"]
    assert {m["name"]: m["kind"] for m in models} == {"default": "local", "remote": "openai", "plain": "openai"}
    assert str(proxy.port) not in json.dumps(models)


def test_an_agent_generates_chats_and_streams_on_a_remote_core_and_pays_for_it(rkernel, proxy):
    before = len(proxy.heads)
    rec, out = rkernel.run("""
        import json
        from agentproc import llm
        a = llm.generate("The capital of France is", max_tokens=8, model="remote")
        s = llm.generate("Once upon a time", max_tokens=12, model="remote", stream=True)
        pieces = list(s)
        c = llm.chat([{"role": "user", "content": "Say hello."}], max_tokens=8, model="remote")
        used = [x.usage for x in (a, s.completion, c)]
        print("RESULT", json.dumps({"text": a.text, "reason": a.finish_reason, "pieces": len(pieces),
                                    "joined": "".join(pieces) == s.completion.text, "chat": c.text,
                                    "tokens": sum(u["prompt_tokens"] + u["completion_tokens"] for u in used),
                                    "completion": [u["completion_tokens"] for u in used]}))
    """)
    assert rec["exit_status"] == 0, out
    res = agent_result(out)
    assert res["text"].strip() and res["reason"] == "length" and res["completion"][0] == 8
    assert res["pieces"] > 1 and res["joined"]
    assert rec["usage"]["llm_tokens"] == res["tokens"]  # what the server reported, charged to the agent
    heads = proxy.heads[before:]
    assert len(heads) == 3 and all(b"authorization: bearer sk-test-remote-key" in h.lower() for h in heads)


def test_json_schema_and_tool_calls_go_as_response_format(rkernel):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    got = rkernel.client.call("llm.chat", {"messages": [{"role": "user", "content": "Name a city as JSON."}],
                                           "json_schema": schema, "max_tokens": 40, "model": "remote"})
    assert isinstance(json.loads(got["text"])["city"], str)
    got = rkernel.client.call("llm.chat", {"messages": [{"role": "user", "content": "What is 2 + 3?"}],
                                           "tools": ["calculator"], "max_tokens": 60, "model": "remote"})
    assert got["finish_reason"] in ("tool_calls", "length"), got
    if got["finish_reason"] == "tool_calls":
        assert got["tool_calls"][0]["function"]["name"] == "calculator"


def test_what_the_server_cannot_do_is_enotsup(rkernel, proxy):
    c = rkernel.client
    before = len(proxy.heads)
    with pytest.raises(ENOTSUP, match="use llm.chat"):
        c.call("llm.generate", {"prompt": "x", "model": "plain"})
    with pytest.raises(ENOTSUP, match="response_format"):
        c.call("llm.chat", {"messages": [{"role": "user", "content": "x"}], "json_schema": {"type": "object"},
                            "model": "plain"})
    with pytest.raises(ENOTSUP, match="response_format"):
        c.call("llm.chat", {"messages": [{"role": "user", "content": "x"}], "tools": ["calculator"],
                            "model": "plain"})
    with pytest.raises(ENOTSUP, match="use llm.chat"):
        c.call("llm.generate", {"prompt": "x", "json_schema": {"type": "object"}, "model": "remote"})
    assert len(proxy.heads) == before  # refused before anything was sent


def test_cancel_closes_the_http_stream(rkernel, proxy):
    c = rkernel.client
    aborted = proxy.aborted
    s = c.stream("llm.generate", {"prompt": "Once upon a time", "max_tokens": 400, "model": "remote"})
    next(iter(s))
    assert c.call("llm.cancel", {"id": s.rid}) == {"cancelled": True}
    with pytest.raises(ECANCELED):
        list(s)
    deadline = time.monotonic() + 20
    while proxy.aborted == aborted:  # the server's answer found its client gone
        assert time.monotonic() < deadline, "the kernel kept the cancelled stream open"
        time.sleep(0.1)
    assert remote_stats(rkernel)["active"] == 0


def test_a_server_dying_mid_stream_fails_that_request_only(rkernel, proxy):
    c = rkernel.client
    proxy.mode, proxy.cut_after = "cut", 1200
    s = c.stream("llm.generate", {"prompt": "Once upon a time", "max_tokens": 200, "model": "remote"})
    local = c.send("llm.generate", {"prompt": "The capital of France is", "max_tokens": 8})
    with pytest.raises(EIO, match="dropped the connection"):
        list(s)
    assert c.next_message(local, 60)["result"]["usage"]["completion_tokens"] == 8  # the local core served
    proxy.mode = "pass"
    assert c.call("llm.generate", {"prompt": "Hello", "max_tokens": 4, "model": "remote"})["text"]


def test_a_slow_server_times_out_and_does_not_stall_the_local_core(rkernel, proxy):
    proxy.mode, proxy.delay_s = "delay", 8
    c = rkernel.client
    remote = c.send("llm.generate", {"prompt": "Hello", "max_tokens": 4, "model": "remote"})
    local = c.call("llm.generate", {"prompt": "The capital of France is", "max_tokens": 8})
    assert local["usage"]["completion_tokens"] == 8  # answered while the remote one waits on its server
    msg = c.next_message(remote, 30)
    assert msg["error"]["code"] == "ETIMEDOUT", msg
    proxy.mode = "pass"


def test_500_is_retried_then_eio_and_the_breaker_fails_fast(rkernel, proxy):
    c = rkernel.client
    proxy.mode = "500"
    stats0 = remote_stats(rkernel)
    sent = proxy.requests
    with pytest.raises(EIO, match="HTTP 500"):
        c.call("llm.generate", {"prompt": "Hello", "max_tokens": 4, "model": "remote"})
    assert proxy.requests - sent == 2  # the attempt and one retry ([models] retries = 1)
    with pytest.raises(EIO):
        c.call("llm.generate", {"prompt": "Hello", "max_tokens": 4, "model": "remote"})
    assert remote_stats(rkernel)["breaker"] == "open"
    sent = proxy.requests
    with pytest.raises(EIO, match="circuit breaker"):
        c.call("llm.generate", {"prompt": "Hello", "max_tokens": 4, "model": "remote"})
    assert proxy.requests == sent  # failed at once, the server untouched
    assert c.call("llm.generate", {"prompt": "Hi", "max_tokens": 4})["text"] is not None  # local unaffected
    proxy.mode = "pass"
    time.sleep(2.2)  # breaker_s: then one probe goes through and closes it
    assert c.call("llm.generate", {"prompt": "Hello", "max_tokens": 4, "model": "remote"})["text"]
    stats = remote_stats(rkernel)
    assert stats["breaker"] == "closed" and stats["retries"] > stats0["retries"]
    assert stats["breaker_opened"] == stats0["breaker_opened"] + 1


def test_remote_config_is_checked(tmp_path):
    from tests.helpers import config_error

    config_error(tmp_path, '[models.r]\nkind = "openai"\n', "base_url")
    config_error(tmp_path, '[models.r]\nkind = "openai"\nbase_url = "ftp://x"\n', "base_url")
    config_error(tmp_path, '[models.r]\nkind = "cloud"\n', "expected one of local, openai")
    config_error(tmp_path, '[models.r]\nkind = "openai"\nbase_url = "http://x/v1"\nconcurrency = 0\n',
                 "concurrency = 0: expected an integer from 1")
    config_error(tmp_path, '[models.r]\nkind = "openai"\nbase_url = "http://x/v1"\napi_key_file = "a"\n'
                 'api_key_env = "B"\n', "not both")
    config_error(tmp_path, '[models.r]\nkind = "openai"\nbase_url = "http://x/v1"\nresponse_format = "xml"\n',
                 "response_format")


def test_a_missing_key_stops_the_kernel_at_start_with_its_name(tmp_path, proxy):
    with pytest.raises(RuntimeError, match="AIOSD_NO_SUCH_KEY"):
        KernelProc(tmp_path, TEST_CONFIG + f'[models.r]\nkind = "openai"\nbase_url = "{proxy.base_url}"\n'
                                           'api_key_env = "AIOSD_NO_SUCH_KEY"\n')
