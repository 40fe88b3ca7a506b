"""Attacks through tools (docs/abi.md, "Tools"; kernel/tools.py): a tool that crashes, loops, allocates without
end or forks without end fails its own call only; the Python runner has no network, no exec, no other agent's
files; one caller cannot leave anything in a worker for the next; instances and queues are bounded; only the
kernel's workers may take jobs.
"""
from __future__ import annotations

import threading
import time

import msgpack
import pytest

from agentproc import storage, tools
from agentproc.errors import EINVAL, EPERM, ETIMEDOUT, ETOOL
from tests.escape.conftest import attack, denied, neighbour_of
from tests.helpers import agent_result

pytestmark = pytest.mark.timeout(240)

HOSTILE = {
    "loop": ("while True: pass", ETIMEDOUT),
    "crash": ("import ctypes; ctypes.string_at(0)", ETOOL),
    "exit": ("import os; os._exit(7)", ETOOL),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_misbehaving_tool_fails_its_own_call_only(kernel, neighbour, case):
    code, error = HOSTILE[case]
    with pytest.raises(error):
        tools.call("python", code=code, client=kernel.client)
    assert tools.call("calculator", expression="6*7", client=kernel.client) == {"value": 42}
    assert tools.call("python", code="1 + 1", client=kernel.client)["result"] == "2"  # a fresh worker
    neighbour.assert_unharmed()


CONTAINED = """
import json
from agentproc import storage, tools
checks = {
    "alloc": "x = bytearray(10 * 1024**3)",
    "fork": "import os\\npids = [os.fork() for _ in range(100)]",
    "exec": "import os\\nos.execv('/bin/sh', ['sh', '-c', 'id'])",
    "net": "import socket\\ns = socket.create_connection(('127.0.0.1', 22), timeout=2)",
    "secret": "open(%r).read()",
    "kernel_files": "import os\\nos.listdir(%r)",
}
out = {}
for name, code in checks.items():
    r = tools.call("python", code=code)
    out[name] = r["error"]
print("RESULT", json.dumps(out), flush=True)
"""


def test_the_python_runner_is_sandboxed(kernel, neighbour):
    source = CONTAINED % (str(neighbour.secret), str(kernel.runtime_dir))
    rec, out = kernel.run(source, name="tool-prober", timeout=120)
    assert rec["exit_status"] == 0, out
    r = agent_result(out)
    assert r["alloc"].startswith("MemoryError"), r
    for name in ("fork", "exec", "net", "secret", "kernel_files"):
        assert r[name] and r[name].split(":")[0] in ("PermissionError", "OSError", "BlockingIOError",
                                                      "ConnectionRefusedError", "FileNotFoundError"), (name, r)
    neighbour.assert_unharmed()


def test_a_caller_leaves_nothing_for_the_next_one(kernel):
    tools.call("python", code="import builtins\nbuiltins.LEFT = 'planted'\nopen('left.txt', 'w').write('x')",
               client=kernel.client)
    after = tools.call("python", code="import builtins, os\n(getattr(builtins, 'LEFT', None), "
                                      "os.path.exists('left.txt'))", client=kernel.client)
    assert after["result"] == "(None, False)", after


def test_instances_bound_concurrency_and_queues_are_fifo(kernel):
    """20 callers at once on a tool with 2 instances: never more than 2 run at a time, and all are served."""
    spans, errors = [], []

    def caller():
        client = kernel.new_client(timeout=120)
        try:
            r = tools.call("python", code="import time\nt = time.time()\ntime.sleep(0.3)\n(t, time.time())",
                           client=client)
            spans.append(eval(r["result"]))  # noqa: S307 -- a tuple of two floats from our own code
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(spans) == 20, errors
    points = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, step in points:
        running += step
        peak = max(peak, running)
    assert peak <= 2, f"{peak} calls of a 2-instance tool ran at once"


FAKE_WORKER = """
from agentproc import client
c = client.default()
attempt("next", lambda: c.call("tool.next", timeout=5))
attempt("done", lambda: c.call("tool.done", {"job": 1, "result": "forged"}, timeout=5))
"""


def test_only_the_kernels_workers_take_jobs(kernel, neighbour):
    rec, results, out = attack(kernel, FAKE_WORKER, name="fake-worker")
    assert denied(results, "next", "EPERM") and denied(results, "done", "EPERM"), out
    with pytest.raises(EPERM):  # an operator is no worker either
        kernel.client.call("tool.next", timeout=5)
    neighbour.assert_unharmed()


def test_a_flood_of_calls_is_bounded_by_the_queue(kernel):
    """300 calls at once on a one-instance tool: the queue takes 64, the rest get EAGAIN at once (answers past
    the peer's answer bound are dropped, as for any peer that does not read), and the tool serves on."""
    client = kernel.new_client(timeout=60)
    for _ in range(300):
        client.sock.send(msgpack.packb({"v": 1, "id": 1, "call": "tool.call",
                                        "args": {"name": "text", "args": {"op": "upper", "text": "x" * 1000}}}))
    codes: dict = {}
    while client.sock.poll(3000):
        msg = msgpack.unpackb(client.sock.recv())
        code = "ok" if msg.get("ok") else msg["error"]["code"]
        codes[code] = codes.get(code, 0) + 1
    assert codes.get("ok", 0) >= 1 and codes.get("EAGAIN", 0) >= 1 and set(codes) <= {"ok", "EAGAIN"}, codes
    assert tools.call("text", op="lower", text="OK", client=kernel.client) == {"text": "ok"}


def test_a_group_calls_only_its_tools(tmp_path, model_path):
    from kernel.testing import TEST_CONFIG, KernelProc

    k = KernelProc(tmp_path, TEST_CONFIG + '\n[groups.calc]\nprivileges = ["basic", "tools"]\n'
                                           'tools = ["calculator"]\n')
    try:
        rec, results, out = attack(k, """
from agentproc import storage, tools
attempt("list", lambda: [t["name"] for t in tools.list()])
attempt("calc", lambda: tools.call("calculator", expression="2+3")["value"])
attempt("python", lambda: tools.call("python", code="1"))
""", group="calc", name="calc-agent")
        assert results["list"] == "OK ['calculator']" and results["calc"] == "OK 5", out
        assert denied(results, "python", "EPERM"), out
    finally:
        k.stop()


DEPUTY = """
from agentproc import storage, tools
storage.put("mine.txt", "caller's own")
attempt("write", lambda: tools.call("storage", op="write", key="via-tool.txt", data="written by the tool")["version"])
attempt("read_back", lambda: storage.get("via-tool.txt").text)
attempt("read_own", lambda: tools.call("storage", op="read", key="mine.txt")["text"])
attempt("list", lambda: tools.call("storage", op="list")["keys"])
attempt("victim", lambda: tools.call("storage", op="read", key="secret.txt")["text"])
attempt("python_storage", lambda: tools.call("python", code="from agentproc import storage\\nstorage.get('x')")["error"])
attempt("bad_args", lambda: tools.call("storage", op="write", key="k"))
"""


def test_the_storage_tool_acts_with_its_callers_rights_only(kernel, neighbour):
    storage.put("secret.txt", "the victim's", namespace="deputy-victim", client=kernel.client)
    rec, results, out = attack(kernel, DEPUTY, name="deputy-user")
    assert results["write"] == "OK 1" and results["read_back"] == "OK written by the tool", out
    assert results["read_own"] == "OK caller's own", out
    assert results["list"] == "OK ['mine.txt', 'via-tool.txt']", out
    assert denied(results, "victim", "ETOOL"), out  # ENOENT inside: the caller's own namespace has no secret.txt
    assert results["python_storage"].startswith("OK EACCES"), out  # a tool that does not act for its caller
    assert denied(results, "bad_args", "EINVAL"), out
    assert storage.get("secret.txt", namespace="deputy-victim", client=kernel.client).text == "the victim's"
    neighbour.assert_unharmed()


# ---- MCP servers (tests/mcp/): sandboxed like tool workers, checked like built-ins, hostile ones survived ----

MCP_DIR = __import__("pathlib").Path(__file__).resolve().parent.parent / "mcp"


@pytest.fixture(scope="module")
def mcp_kernel(tmp_path_factory, model_path):
    from kernel.testing import TEST_CONFIG, KernelProc

    k = KernelProc(tmp_path_factory.mktemp("mcp-escape"), TEST_CONFIG + f"""
[mcp.demo]
command = ["python", "{MCP_DIR / 'demo_server.py'}"]
timeout_s = 5

[mcp.evil]
command = ["python", "{MCP_DIR / 'evil_server.py'}"]
confirm = "never"
timeout_s = 5

[groups.calc]
privileges = ["basic", "tools"]
tools = ["calculator", "demo.add"]
""")
    yield k
    k.stop()


def test_an_mcp_server_runs_in_the_sandbox(mcp_kernel):
    """The server reads its program and packages, nothing of the kernel's or another agent's, and has no
    network: it is a sandboxed process like a tool worker, not the kernel."""
    from tests.conftest import STATE_DIR

    with neighbour_of(mcp_kernel) as near:
        model = next(STATE_DIR.glob("models/*.gguf"))
        paths = [str(model), str(mcp_kernel.config_path), str(near.secret), "/etc/shadow",
                 str(MCP_DIR / "demo_server.py")]
        answer = tools.call("demo.probe", {"paths": paths}, client=mcp_kernel.client)
        got = answer["structured"] or __import__("json").loads(answer["content"][0]["text"])
        assert got[str(MCP_DIR / "demo_server.py")].startswith("read"), got
        for p in paths[:4]:
            assert got[p].startswith("denied"), (p, got)
        assert got["tcp"].startswith("denied"), got
        server_pid = got["pid"]
        workers = [p for p in mcp_kernel.client.call("proc.list")["procs"] if p["name"] == "mcp-demo"
                   and p["state"] == "RUNNING"]
        assert workers and all(w["layers"]["seccomp"].startswith("on") for w in workers), workers
        assert all("exec" in w["layers"]["seccomp"] and "network" not in w["layers"]["seccomp"] for w in workers)
        import psutil
        assert psutil.Process(server_pid).ppid() in {w["pid"] for w in workers}  # the bridge's child
        near.assert_unharmed()


def test_a_hostile_mcp_server_is_survived(mcp_kernel):
    """Bad names, non-schemas, huge and self-referencing schemas are left out or contained; a backtracking
    pattern is left to the server (the kernel's event loop never runs it); a result that breaks its output
    schema is ETOOL; a flood fails its call; the kernel serves everyone throughout."""
    c = mcp_kernel.client
    listing = c.call("tool.list")
    names = {t["name"] for t in listing["tools"] if t["name"].startswith("evil.")}
    assert names == {"evil.ok", "evil.redos", "evil.liar", "evil.flood"}, names  # the others left out
    assert tools.call("evil.ok", s="hi", client=c)["content"][0]["text"] == "{'s': 'hi'}"
    with pytest.raises(EINVAL):
        tools.call("evil.ok", s=5, client=c)
    t0 = time.monotonic()
    for _ in range(3):  # 40 a's then a b: catastrophic for ^(a+)+$ -- if the kernel ran it
        try:
            tools.call("evil.redos", s="a" * 40 + "b", client=c)
        except (ETOOL, ETIMEDOUT):
            pass
    assert time.monotonic() - t0 < 30
    with pytest.raises(ETOOL, match="structured content|output schema"):  # the client's check, then the kernel's
        tools.call("evil.liar", client=c)
    with pytest.raises((ETOOL, ETIMEDOUT)):
        tools.call("evil.flood", client=c)
    assert c.call("sys.ping") == {"pong": True}
    assert tools.call("demo.add", a=1, b=2, client=c)["structured"] == {"result": 3}


MCP_DEPUTY = """
from agentproc import tools
from agentproc.client import default
attempt("list", lambda: sorted(t["name"] for t in tools.list()))
attempt("add", lambda: tools.call("demo.add", a=2, b=2)["structured"]["result"])
attempt("probe", lambda: tools.call("demo.probe", paths=[]))
attempt("evil", lambda: tools.call("evil.ok"))
attempt("register", lambda: default().call("tool.register", {"tools": [{"name": "x", "input_schema": {}}]}))
attempt("next", lambda: default().call("tool.next"))
"""


def test_agents_reach_mcp_tools_only_as_their_group_allows(mcp_kernel):
    rec, results, out = attack(mcp_kernel, MCP_DEPUTY, group="calc", name="mcp-calc")
    assert results["list"] == "OK ['calculator', 'demo.add']", out
    assert results["add"] == "OK 4", out
    for name in ("probe", "evil", "register", "next"):
        assert denied(results, name, "EPERM"), (name, out)
