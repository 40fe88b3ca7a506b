"""Escapes through the kernel's own socket: forged identities, malformed and oversize frames."""
from __future__ import annotations

import pytest

from tests.escape.conftest import attack, need

pytestmark = pytest.mark.timeout(60)

FORGE = """
import zmq, msgpack
from agentproc import client
def forged():
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.ROUTING_ID, b"A" + os.urandom(15))   # not the routing id the kernel gave us
    s.connect(client.default().endpoint)
    s.send(msgpack.packb({"v": 1, "id": 1, "call": "proc.list"}))
    if not s.poll(3000):
        return "no answer"
    return msgpack.unpackb(s.recv())["error"]["code"]
attempt("forged", forged)
attempt("own", lambda: client.default().call("sys.ping", timeout=10))
"""


def test_forge_identity_without_connect(kernel, layers, neighbour):
    """Default group: a second connection cannot even be made (connect() is denied after boot)."""
    need(layers, "seccomp")
    rec, res, out = attack(kernel, FORGE)
    assert rec["exit_status"] == 0, out
    assert res["forged"] == "OK no answer", out
    assert res["own"] == "OK {'pong': True}", out
    neighbour.assert_unharmed()


def test_forge_identity_with_connect(kernel, neighbour):
    """A group that keeps connect(): the kernel itself refuses a routing id it did not hand out."""
    rec, res, out = attack(kernel, FORGE, group="trusted")
    assert rec["exit_status"] == 0, out
    assert res["forged"] == "OK EPERM", out
    assert res["own"] == "OK {'pong': True}", out
    neighbour.assert_unharmed()


def test_malformed_and_oversize_frames(kernel, neighbour):
    rec, res, out = attack(kernel, """
        import msgpack
        from agentproc import client
        c = client.default()
        sock = c.sock
        def ask(frame, multipart=False):
            sock.send_multipart(frame) if multipart else sock.send(frame)
            if not sock.poll(5000):
                return "no answer"
            return msgpack.unpackb(sock.recv())["error"]["code"]
        attempt("garbage", lambda: ask(b"\\xc1\\xc1\\xc1"))
        attempt("not_a_map", lambda: ask(msgpack.packb([1, 2, 3])))
        attempt("bad_version", lambda: ask(msgpack.packb({"v": 99, "id": 1, "call": "sys.ping"})))
        attempt("forged_pid", lambda: ask(msgpack.packb({"v": 1, "id": 2, "call": "proc.self", "pid": 1})))
        attempt("oversize", lambda: ask(msgpack.packb({"v": 1, "id": 3, "call": "llm.generate",
                                                       "args": {"prompt": "x" * 100_000}})))
        attempt("multipart", lambda: ask([msgpack.packb({"v": 1, "id": 4, "call": "sys.ping"}), b"x"], True))
        attempt("still_served", lambda: c.call("sys.ping", timeout=10))
        # over the hard limit (2 x max_frame): libzmq drops our connection, and connect() is not ours again
        sock.send(b"\\x00" * (1 << 20))
        attempt("after_drop", lambda: c.call("sys.ping", timeout=2))
    """)
    assert rec["exit_status"] == 0, out
    assert res["garbage"] == "OK EBADMSG" and res["not_a_map"] == "OK EPROTO", out
    assert res["bad_version"] == "OK EPROTO" and res["forged_pid"] == "OK EPROTO", out
    assert res["oversize"] == "OK E2BIG" and res["multipart"] == "OK EPROTO", out
    assert res["still_served"] == "OK {'pong': True}", out
    assert res["after_drop"] in ("DENIED ETIMEDOUT", "OK {'pong': True}"), out
    neighbour.assert_unharmed()
