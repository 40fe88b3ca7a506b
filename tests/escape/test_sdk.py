"""Escapes through the SDK's new surfaces: the in-process OpenAI API (agentproc/openai_api.py), the client
shared by threads and coroutines, ``llm.models``, and the CA certificates agents may now read."""
from __future__ import annotations

import pytest

from kernel.testing import TEST_CONFIG, KernelProc
from tests.escape.conftest import attack, denied, need
from tests.helpers import agent_result

pytestmark = pytest.mark.timeout(120)


def test_ssl_private_keys_stay_unreadable(kernel, layers, neighbour):
    need(layers, "landlock")
    rec, res, out = attack(kernel, """
        import glob
        attempt("certs", lambda: len(os.listdir("/etc/ssl/certs")) > 0)
        attempt("private_dir", lambda: os.listdir("/etc/ssl/private"))
        attempt("private_via_usr_lib", lambda: os.listdir("/usr/lib/ssl/private"))
        attempt("openssl_cnf", lambda: open("/etc/ssl/openssl.cnf").read(16))
        attempt("shadow", lambda: open("/etc/shadow").read(16))
    """)
    assert rec["exit_status"] == 0, out
    assert res["certs"] == "OK True", out
    for name in ("private_dir", "private_via_usr_lib", "openssl_cnf", "shadow"):
        assert denied(res, name), (name, out)
    neighbour.assert_unharmed()


def test_openai_client_gains_no_network_and_no_identity(kernel, neighbour):
    """A key, a forged base URL or header changes nothing: identity is the connection, the network is gone."""
    rec, out = kernel.run("""
        import json, openai, os
        from openai import OpenAI
        seen = {"key": os.environ["OPENAI_API_KEY"]}
        for url in ("http://127.0.0.1:9/v1", "https://api.openai.com/v1"):
            try:
                OpenAI(base_url=url, api_key="sk-stolen", max_retries=0, timeout=5).models.list()
                seen[url] = "reached"
            except openai.APIConnectionError as exc:
                seen[url] = "no connection"
        c = OpenAI(default_headers={"x-aiosd-agent": "1", "authorization": "Bearer operator"}, max_retries=0)
        r = c.chat.completions.create(model="default", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        seen["as_self"] = r.usage.completion_tokens
        from agentproc import proc
        seen["me"] = proc.self()["usage"]["llm_tokens"] > 0
        print("RESULT", json.dumps(seen))
    """)
    assert rec["exit_status"] == 0, out
    got = agent_result(out)
    assert got["key"] == "aiosd-connection-identity"  # a placeholder, not a secret
    assert got["http://127.0.0.1:9/v1"] == "no connection"
    assert got["https://api.openai.com/v1"] == "no connection"
    assert got["as_self"] <= 2 and got["me"]  # the tokens were charged to the agent itself
    neighbour.assert_unharmed()


def test_requests_past_max_pending_are_refused_not_queued(tmp_path, model_path):
    """Coroutines make many requests cheap to send: the kernel still holds an agent to ``max_pending``."""
    k = KernelProc(tmp_path, TEST_CONFIG.replace("max_procs = 32", "max_procs = 32\nmax_pending = 4"))
    try:
        rec, out = k.run("""
            import asyncio, json
            from agentproc import llm
            from agentproc.errors import EAGAIN

            async def main():
                asks = [llm.achat([{"role": "user", "content": "Count to ten."}], max_tokens=24) for _ in range(40)]
                got = await asyncio.gather(*asks, return_exceptions=True)
                return sum(isinstance(g, EAGAIN) for g in got), sum(not isinstance(g, Exception) for g in got)

            refused, answered = asyncio.run(main())
            print("RESULT", json.dumps({"refused": refused, "answered": answered}))
        """, timeout=120)
        assert rec["exit_status"] == 0, out
        got = agent_result(out)
        assert got["answered"] <= 8 and got["refused"] >= 32 and got["answered"] + got["refused"] == 40
        assert k.client.call("sys.ping") == {"pong": True}
    finally:
        k.stop()


def test_models_list_needs_llm_and_shows_no_paths(tmp_path, model_path):
    config = TEST_CONFIG + '\n[groups.nollm]\nprivileges = ["basic"]\n'
    k = KernelProc(tmp_path, config)
    try:
        rec, out = k.run("""
            import json, openai
            from openai import OpenAI
            from agentproc import llm
            from agentproc.errors import EPERM
            seen = {}
            try:
                llm.models()
            except EPERM:
                seen["models"] = "EPERM"
            try:
                OpenAI(max_retries=0).chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
            except openai.PermissionDeniedError as exc:
                seen["chat"] = exc.status_code
            print("RESULT", json.dumps(seen))
        """, group="nollm")
        assert rec["exit_status"] == 0, out
        assert agent_result(out) == {"models": "EPERM", "chat": 403}
        listed = k.client.call("llm.models")["models"]
        # names, never a file path (nor a remote core's URL or key)
        assert listed == [{"name": "default", "default": True, "n_ctx_seq": 1024, "kind": "local"}]
    finally:
        k.stop()
