"""Escapes through the kernel around the sandbox: identity after death, syscalls that crash or stall it,
resources it spends for an agent, limits evaded through it (issue classes in docs/sandbox.md, "Threat model").

Every attacker runs next to a ``neighbour``; each test ends by checking that the kernel still serves and that
the neighbour is unharmed.
"""
from __future__ import annotations

import time

import pytest

from tests.escape.conftest import attack, kill, spawn, wait_output

pytestmark = pytest.mark.timeout(120)


def _kernel_rss_mb(kernel) -> float:
    with open(f"/proc/{kernel.popen.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _names(kernel) -> set:
    return {p["name"] for p in kernel.client.call("proc.list")["procs"]}


SPAWN_FRAMES = """
import msgpack
from agentproc import client
sock = client.default().sock
frame = msgpack.packb({"v": 1, "id": 1, "call": "proc.spawn",
                       "args": {"source": "print('escalated')", "group": "admin", "name": "escalated"}})
for i in range(3000):
    sock.send(frame)
print("queued", flush=True)
os._exit(0)   # exit with the frames still queued: they must never be served with more rights
"""


def test_frames_queued_before_exit_are_never_served_as_an_operator(kernel, neighbour):
    rec, res, out = attack(kernel, SPAWN_FRAMES, limits={"syscall_rate": 10_000_000})
    assert "queued" in out, out
    time.sleep(1.0)  # whatever was still queued has been read by now
    assert "escalated" not in _names(kernel)
    neighbour.assert_unharmed()


def test_a_reaped_childs_connection_is_not_an_operator(kernel, neighbour):
    """A group that may fork: its child connects, queues frames and exits; the parent reaps it."""
    rec, res, out = attack(kernel, """
        import msgpack, zmq
        from agentproc import client
        endpoint = client.default().endpoint
        pid = os.fork()
        if pid == 0:
            ctx = zmq.Context()
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 2000)
            s.connect(endpoint)
            frame = msgpack.packb({"v": 1, "id": 1, "call": "proc.spawn",
                                   "args": {"source": "print(1)", "group": "admin", "name": "escalated"}})
            for i in range(500):
                s.send(frame)
            s.close()
            ctx.term()
            os._exit(0)
        os.waitpid(pid, 0)
        time.sleep(1.0)
        print("reaped", flush=True)
    """.replace("import msgpack", "import time, msgpack"), group="trusted")
    assert "reaped" in out, out
    time.sleep(0.5)
    assert "escalated" not in _names(kernel)
    neighbour.assert_unharmed()


CALL = """
import json
from agentproc import client
from agentproc.errors import SyscallError
def code(call, args):
    try:
        client.default().call(call, args, timeout=60)
        return "ok"
    except SyscallError as e:
        return e.code
"""


@pytest.mark.parametrize("schema", [
    {"type": "string", "maxLength": 20000},
    {"type": "string", "maxLength": 2**31 - 1},
    {"type": "array", "items": {"type": "integer"}, "maxItems": 100000},
    {"type": "string", "pattern": "^a{0,100000}$"},
], ids=["maxLength", "maxLength-2^31", "maxItems", "pattern"])
def test_a_huge_json_schema_is_einval_not_a_crash(kernel, neighbour, schema):
    rec, res, out = attack(kernel, CALL + f"""
attempt("schema", lambda: code("llm.generate", {{"prompt": "x", "max_tokens": 2, "json_schema": {schema!r}}}))
""")
    assert res["schema"] == "OK EINVAL", out
    assert kernel.popen.poll() is None
    neighbour.assert_unharmed()


def test_malformed_arguments_are_answered_with_their_own_codes(kernel, neighbour):
    """Deep nesting, invalid UTF-8, a NUL in a chat message, an out-of-range top_k: never EIO."""
    rec, res, out = attack(kernel, CALL + r"""
import msgpack
sock = client.default().sock
def raw(data):
    sock.send(data)
    assert sock.poll(10000)
    msg = msgpack.unpackb(sock.recv())
    return msg["error"]["code"]
attempt("nested", lambda: raw(b"\x91" * 60000 + b"\xc0"))
attempt("nested_args", lambda: raw(b"\x84\xa1v\x01\xa2id\x05\xa4call\xa8sys.ping\xa4args" + b"\x91" * 60000 + b"\xc0"))
attempt("utf8", lambda: raw(b"\x84\xa1v\x01\xa2id\x06\xa4call\xacllm.generate\xa4args\x81\xa6prompt\xa2\xff\xfe"))
attempt("nul_chat", lambda: code("llm.chat", {"messages": [{"role": "user", "content": "a\x00b"}], "max_tokens": 1}))
attempt("top_k", lambda: code("llm.generate", {"prompt": "x", "max_tokens": 1, "top_k": 2**40}))
""")
    assert res["nested"] in ("OK EBADMSG", "OK EPROTO"), out  # a list is not an envelope: refused before its depth
    assert res["nested_args"] in ("OK EBADMSG", "OK EINVAL"), out
    assert res["utf8"] in ("OK EBADMSG", "OK EINVAL"), out
    assert res["nul_chat"] == "OK EINVAL", out
    assert res["top_k"] == "OK EINVAL", out
    assert "Traceback" not in kernel.log()[-20000:]
    neighbour.assert_unharmed()


def test_undecodable_frames_count_against_the_syscall_rate(kernel, neighbour):
    rec, res, out = attack(kernel, """
        import msgpack
        from agentproc import client
        sock = client.default().sock
        for i in range(2000):
            sock.send(b"\\xc1garbage")
        codes = {}
        for i in range(2000):
            if not sock.poll(5000):
                break
            code = msgpack.unpackb(sock.recv())["error"]["code"]
            codes[code] = codes.get(code, 0) + 1
        print("codes", sorted(codes.items()), flush=True)
    """, limits={"syscall_rate": 100})
    assert "EAGAIN" in out, out  # over the rate: refused before the kernel decodes it
    assert rec["usage"]["syscalls"] >= 2000, rec["usage"]
    neighbour.assert_unharmed()


def test_pending_generations_are_capped_per_agent(kernel, neighbour):
    rec, res, out = attack(kernel, """
        import msgpack
        from agentproc import client
        sock = client.default().sock
        for i in range(200):
            sock.send(msgpack.packb({"v": 1, "id": 10 + i, "call": "llm.generate",
                                     "args": {"prompt": "Once upon a time", "max_tokens": 64}}))
        codes = {}
        for i in range(200):
            assert sock.poll(120000)
            msg = msgpack.unpackb(sock.recv())
            if "seq" in msg:
                continue
            code = "ok" if msg["ok"] else msg["error"]["code"]
            codes[code] = codes.get(code, 0) + 1
            if code == "EAGAIN" and codes[code] == 200 - 32:
                break
        print("codes", sorted(codes.items()), flush=True)
    """, timeout=110)
    assert "('EAGAIN', 168)" in out, out  # [kernel] max_pending = 32 by default
    neighbour.assert_unharmed()


def test_follow_streams_are_capped_per_agent(kernel, neighbour):
    rec, res, out = attack(kernel, """
        import msgpack
        from agentproc import client
        sock = client.default().sock
        me = client.default().call("proc.self")["id"]
        for i in range(50):  # it has printed nothing: an open follow stream sends nothing yet
            sock.send(msgpack.packb({"v": 1, "id": 100 + i, "call": "proc.logs",
                                     "args": {"id": me, "follow": True, "stream": True}}))
        codes = {}
        while sock.poll(3000):
            msg = msgpack.unpackb(sock.recv())
            code = "ok" if msg.get("ok") else msg.get("error", {}).get("code", "chunk")
            codes[code] = codes.get(code, 0) + 1
        print("codes", sorted(codes.items()), flush=True)
    """)
    assert "codes [('EAGAIN', 42)]" in out, out  # [kernel] max_followers = 8 by default
    neighbour.assert_unharmed()


def test_unread_answers_do_not_grow_the_kernel(kernel, neighbour):
    """An agent that asks for its (large) logs again and again and never reads the answers."""
    before = _kernel_rss_mb(kernel)
    rec = spawn(kernel, """
        import msgpack
        from agentproc import client
        print("x" * 1_000_000, flush=True)
        c = client.default()
        me = c.call("proc.self")["id"]
        frame = msgpack.packb({"v": 1, "id": 99, "call": "proc.logs", "args": {"id": me}})
        for i in range(5000):
            c.sock.send(frame)
        print("sent", flush=True)
        time.sleep(30)
    """.replace("import msgpack", "import time, msgpack"), limits={"syscall_rate": 10_000_000})
    try:
        wait_output(kernel, rec["id"], "sent", timeout=60)
        time.sleep(1.0)
        grown = _kernel_rss_mb(kernel) - before
        assert grown < 100, f"the kernel grew by {grown:.0f} MiB for answers nobody reads"
        neighbour.assert_unharmed()
    finally:
        kill(kernel, rec["id"])


def test_cancelled_generations_are_charged(kernel, neighbour):
    rec, res, out = attack(kernel, """
        from agentproc import client
        from agentproc.errors import ECANCELED
        c = client.default()
        for i in range(3):
            rid = c.send("llm.generate", {"prompt": "Tell me a long story about the sea.", "max_tokens": 200,
                                          "stream": True})
            assert "seq" in c.next_message(rid, 60)  # it has computed its prompt and a token
            c.call("llm.cancel", {"id": rid})
            while "seq" in c.next_message(rid, 60):
                pass
        print("used", c.call("proc.self")["usage"]["llm_tokens"], flush=True)
    """)
    used = int(out.split("used")[1].split()[0])
    assert used >= 3 * 8, out  # three prompts and their first tokens at least
    neighbour.assert_unharmed()
