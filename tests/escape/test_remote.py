"""Escapes through a remote LLM core (docs/remote.md): its key, its server and its concurrency budget belong to
the kernel.  A hostile agent looks for the key everywhere it can reach, calls the server directly, and tries to
take every place of the budget; the kernel really uses the key (the server sees it) and its neighbours are
served meanwhile."""
from __future__ import annotations

import time

import pytest

from tests.escape.conftest import attack, denied, need, neighbour_of, spawn, wait_output
from kernel.testing import TEST_CONFIG, FaultProxy, KernelProc, LlamaServer
from tests.helpers import agent_result

pytestmark = pytest.mark.timeout(180)

FILE_KEY = "sk-file-3c1d9e"
ENV_KEY = "sk-env-77b0aa"

CONFIG = TEST_CONFIG + """
[models.remote]
kind = "openai"
base_url = "{url}"
api_key_file = "{key}"
concurrency = 2

[models.envkey]
kind = "openai"
base_url = "{url}"
api_key_env = "AIOSD_TEST_REMOTE_KEY"
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, model_path):
    tmp = tmp_path_factory.mktemp("remote-escape")
    key = tmp / "api.key"
    key.write_text(FILE_KEY + "\n")
    key.chmod(0o600)
    server = LlamaServer(model_path)
    proxy = FaultProxy(server.port)
    mp = pytest.MonkeyPatch()
    mp.setenv("AIOSD_TEST_REMOTE_KEY", ENV_KEY)  # the kernel's environment; agents get a scrubbed one
    try:
        kernel = KernelProc(tmp, CONFIG.format(url=proxy.base_url, key=key))
    except BaseException:
        proxy.close()
        server.stop()
        raise
    finally:
        mp.undo()
    yield kernel, proxy, key
    kernel.stop()
    proxy.close()
    server.stop()


def test_agent_cannot_read_the_key(setup):
    """The key file and the kernel's /proc entries are Landlock's to deny (without it, on a machine where the
    kernel runs as an ordinary user, the same user could read them: those attempts are then left out)."""
    kernel, proxy, key = setup
    probe = kernel.wait(spawn(kernel, "pass", name="layer-probe", prelude=False)["id"], 60)
    files = probe["layers"].get("landlock", "off").startswith("on")
    with neighbour_of(kernel) as n:
        rec, res, out = attack(kernel, """
            import json, os
            from agentproc import llm, proc
            key_file, kpid = sys.argv[1], os.environ.get("AIOSD_KERNEL_PID", "1")
            if sys.argv[2] == "files":
                attempt("key_file", lambda: open(key_file).read())
                attempt("kernel_environ", lambda: open(f"/proc/{kpid}/environ", "rb").read())
                attempt("kernel_mem", lambda: open(f"/proc/{kpid}/mem", "rb").read(1))
            attempt("own_env", lambda: "".join(os.environ.values()))
            # everything the ABI tells an agent about models and itself, and the answers of the remote cores
            seen = json.dumps([llm.models(), proc.self(),
                               llm.generate("Say: ", max_tokens=4, model="remote").text,
                               llm.generate("Say: ", max_tokens=4, model="envkey").text])
            attempt("abi", lambda: seen)
        """, argv=[key, "files" if files else "no-files"])
        assert rec["exit_status"] == 0, out
        if files:
            assert denied(res, "key_file") and denied(res, "kernel_environ") and denied(res, "kernel_mem"), out
        for secret in (FILE_KEY, ENV_KEY, str(proxy.port)):
            assert secret not in out, (secret, out)
        heads = b"\n".join(proxy.heads).lower()  # the kernel did use both keys, on the server's side only
        assert f"bearer {FILE_KEY}".encode() in heads and f"bearer {ENV_KEY}".encode() in heads
        n.assert_unharmed()


def test_agent_cannot_reach_the_server_itself(setup):
    kernel, proxy, _ = setup
    rec, res, out = attack(kernel, """
        import socket, urllib.request
        port = int(sys.argv[1])
        attempt("connect", lambda: socket.create_connection(("127.0.0.1", port), timeout=2))
        attempt("http", lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read())
    """, argv=[proxy.port])
    assert rec["exit_status"] == 0, out
    need(rec["layers"], "seccomp")
    assert denied(res, "connect") and denied(res, "http"), out


def test_agent_cannot_take_the_whole_remote_budget(setup):
    kernel, proxy, _ = setup
    hog = spawn(kernel, """
        from agentproc import llm
        streams = [llm.generate("Once upon a time", max_tokens=120, model="remote", stream=True)
                   for _ in range(4)]
        print("sent", flush=True)
        for s in streams:
            list(s)
            print("hog done one", flush=True)
    """, name="hog")
    wait_output(kernel, hog["id"], "sent")
    rec, out = kernel.run("""
        import json
        from agentproc import llm
        c = llm.generate("The capital of France is", max_tokens=4, model="remote")
        print("RESULT", json.dumps({"n": c.usage["completion_tokens"]}))
    """, name="victim", timeout=120)
    assert rec["exit_status"] == 0, out
    assert agent_result(out)["n"] == 4
    hog_out = kernel.output(hog["id"])
    # the victim got a place of its own (agent_concurrency = 1 of 2) instead of queueing behind all 4
    assert hog_out.count("hog done one") <= 2, hog_out
    kernel.client.call("proc.kill", {"id": hog["id"]})
    kernel.wait(hog["id"], 30)
    deadline = time.monotonic() + 20
    while kernel.client.call("sys.status")["llm"]["remote"]["active"]:  # its streams were closed
        assert time.monotonic() < deadline, "a killed agent's remote requests stayed in flight"
        time.sleep(0.1)
