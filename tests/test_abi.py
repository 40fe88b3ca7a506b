"""The wire protocol (docs/abi.md sections 1-3) spoken by a raw ZeroMQ client against the real kernel.

Every malformed input gets its documented error, and the kernel serves the next request as if nothing had
happened.
"""
from __future__ import annotations

import msgpack
import pytest
import zmq

from syscalls.address import operator_routing_id

from agentproc.errors import EINVAL, ENOENT, ENOSYS, EPERM, ETIMEDOUT


@pytest.fixture
def raw(raw_client):
    """A raw DEALER connection to the kernel with an operator's credential: send bytes, read decoded answers."""
    return raw_client


def error_of(reply: dict) -> str:
    assert reply["ok"] is False, reply
    assert set(reply) == {"v", "id", "ok", "error"}
    assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]
    return reply["error"]["code"]


def assert_still_serving(raw):
    reply = raw.ask({"v": 1, "id": 999, "call": "sys.ping"})
    assert reply == {"v": 1, "id": 999, "ok": True, "result": {"pong": True}}


def test_ping_envelope(raw):
    assert raw.ask({"v": 1, "id": 7, "call": "sys.ping"}) == {"v": 1, "id": 7, "ok": True, "result": {"pong": True}}
    assert raw.ask({"v": 1, "id": 8, "call": "sys.ping", "args": {}})["ok"] is True


@pytest.mark.parametrize("frame, code, rid", [
    (b"\xc1garbage", "EBADMSG", None),                                           # not msgpack
    (msgpack.packb([1, 2, 3]), "EPROTO", None),                                  # not a map
    (msgpack.packb({"v": 1, "call": "sys.ping"}), "EPROTO", None),               # no id
    (msgpack.packb({"v": 1, "id": "x", "call": "sys.ping"}), "EPROTO", None),    # id of the wrong type
    (msgpack.packb({"v": 1, "id": 5}), "EPROTO", 5),                             # no call
    (msgpack.packb({"v": 1, "id": 5, "call": 3}), "EPROTO", 5),                  # call of the wrong type
    (msgpack.packb({"v": 1, "id": 5, "call": "sys.ping", "pid": 1}), "EPROTO", 5),  # unknown envelope key
    (msgpack.packb({"v": 2, "id": 6, "call": "sys.ping"}), "EPROTO", 6),         # ABI version
    (msgpack.packb({"v": "1", "id": 6, "call": "sys.ping"}), "EPROTO", 6),
    (msgpack.packb({"v": 1, "id": 9, "call": "sys.nope"}), "ENOSYS", 9),
    (msgpack.packb({"v": 1, "id": 9, "call": "sys.ping", "args": [1]}), "EINVAL", 9),
    (msgpack.packb({"v": 1, "id": 9, "call": "sys.ping", "args": {"x": 1}}), "EINVAL", 9),
    (msgpack.packb({"v": 1, "id": 10, "call": "llm.generate", "args": {}}), "EINVAL", 10),
    (msgpack.packb({"v": 1, "id": 10, "call": "llm.generate", "args": {"prompt": 5}}), "EINVAL", 10),
    (msgpack.packb({"v": 1, "id": 10, "call": "llm.generate",
                    "args": {"prompt": "x", "max_tokens": "many"}}), "EINVAL", 10),
    (msgpack.packb({"v": 1, "id": 10, "call": "llm.generate",
                    "args": {"prompt": "x", "max_tokens": -1}}), "EINVAL", 10),
    (msgpack.packb({"v": 1, "id": 10, "call": "llm.chat",
                    "args": {"messages": [{"role": "god", "content": "x"}]}}), "EINVAL", 10),
    (msgpack.packb({"v": 1, "id": 11, "call": "proc.kill", "args": {"id": "1"}}), "EINVAL", 11),
])
def test_bad_requests_get_documented_errors(raw, frame, code, rid):
    raw.send(frame)
    reply = raw.recv()
    assert error_of(reply) == code, reply
    assert reply["id"] == rid
    assert_still_serving(raw)


def test_wrong_type_error_names_the_field(raw):
    reply = raw.ask({"v": 1, "id": 1, "call": "llm.generate", "args": {"prompt": "x", "temperature": "hot"}})
    assert error_of(reply) == "EINVAL"
    assert "args.temperature" in reply["error"]["message"]


def test_multi_frame_request_is_refused(raw):
    raw.send(msgpack.packb({"v": 1, "id": 1, "call": "sys.ping"}), b"extra")
    assert error_of(raw.recv()) == "EPROTO"
    assert_still_serving(raw)


def test_oversize_frame_gets_e2big(raw):
    # the test kernel's max_frame is 64 KiB; between it and the hard limit (2x) the kernel answers E2BIG
    reply = raw.ask({"v": 1, "id": 3, "call": "llm.generate", "args": {"prompt": "x" * 100_000}})
    assert error_of(reply) == "E2BIG" and reply["id"] == 3
    assert_still_serving(raw)


def test_frame_over_hard_limit_drops_only_that_connection(kernel, raw):
    ctx = zmq.Context()
    hostile = ctx.socket(zmq.DEALER)
    hostile.setsockopt(zmq.LINGER, 0)
    hostile.connect(kernel.endpoint)
    hostile.send(b"\x00" * (1 << 20))  # 16x max_frame: libzmq (MAXMSGSIZE) disconnects the peer
    assert hostile.poll(1000) == 0
    hostile.close()
    ctx.term()
    assert_still_serving(raw)


def test_unknown_syscall_via_sdk_raises_enosys(kernel):
    with pytest.raises(ENOSYS):
        kernel.client.call("proc.fork")


def test_sdk_raises_errors_named_after_codes(kernel):
    with pytest.raises(ENOENT):
        kernel.client.call("proc.kill", {"id": 99999})
    with pytest.raises(EINVAL) as exc:
        kernel.client.call("llm.generate", {"prompt": "x", "top_p": 0})
    assert "top_p" in str(exc.value)


def test_operator_identity_comes_from_the_connection(kernel):
    me = kernel.client.call("proc.self")
    assert me["name"] == "operator" and me["group"] == "admin" and me["id"] is None
    import os
    assert me["pid"] == os.getpid()


def test_duplicate_routing_id_cannot_hijack_a_connection(kernel):
    routing_id = operator_routing_id(kernel.endpoint)  # an operator's: it carries the operator credential
    victim = kernel.new_client(routing_id=routing_id)
    assert victim.call("sys.ping") == {"pong": True}
    forger = kernel.new_client(timeout=1.0, routing_id=routing_id)
    with pytest.raises(ETIMEDOUT):  # libzmq ignores the second connection claiming a live routing id
        forger.call("sys.ping")
    assert victim.call("sys.ping") == {"pong": True}  # the victim is unaffected
    assert victim.call("proc.self")["pid"] == kernel.client.call("proc.self")["pid"]


def test_agent_cannot_forge_routing_id(kernel):
    rec, out = kernel.run("""
        import zmq, msgpack
        from agentproc import client
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTING_ID, b"A" + b"f" * 15)   # not the routing id the kernel gave us
        s.connect(client.default().endpoint)
        s.send(msgpack.packb({"v": 1, "id": 1, "call": "sys.ping"}))
        assert s.poll(10000)
        print("forged:", msgpack.unpackb(s.recv())["error"]["code"])
        print("own:", client.ping())
    """, group="trusted")  # default-group agents may not open a second connection at all (seccomp)
    assert rec["exit_status"] == 0, out
    assert "forged: EPERM" in out and "own: {'pong': True}" in out


def test_forged_id_fields_in_payload_are_rejected(kernel):
    rec, out = kernel.run("""
        from agentproc import client
        from agentproc.errors import EINVAL, EPERM
        c = client.default()
        for call, args in [("proc.self", {"id": 1}), ("proc.self", {"pid": 1}), ("sys.ping", {"agent": 2})]:
            try:
                c.call(call, args)
            except EINVAL:
                print("EINVAL", call)
        try:
            c.call("proc.logs", {"id": c.call("proc.self")["id"] + 1})
        except EPERM:
            print("EPERM logs")
        try:
            c.call("proc.ready", {"layers": {"seccomp": "on"}})  # only the bootstrap attests, once
        except EPERM:
            print("EPERM ready")
        print("self", c.call("proc.self")["name"])
    """, name="forger")
    assert rec["exit_status"] == 0, out
    assert out.count("EINVAL") == 3 and "EPERM logs" in out and "self forger" in out and "EPERM ready" in out


def test_forked_child_of_agent_is_not_an_agent(kernel):
    rec, out = kernel.run("""
        import os, sys
        from agentproc import client
        from agentproc.errors import EPERM
        endpoint = client.default().endpoint
        pid = os.fork()
        if pid == 0:
            c = client.Client(endpoint, timeout=10)
            try:
                c.call("sys.ping")
                print("child: served")
            except EPERM as e:
                print("child: EPERM")
            sys.stdout.flush()
            os._exit(0)
        os.waitpid(pid, 0)
        print("parent:", client.ping())
    """, group="trusted")  # a group whose agents may fork (docs/abi.md 5)
    assert rec["exit_status"] == 0, out
    assert "child: EPERM" in out and "parent: {'pong': True}" in out


def test_every_syscall_in_the_table_has_a_kernel_handler():
    """syscalls/table.py names each handler; they live in kernel/sys_*.py, and the ABI package never imports
    the kernel (agents import it)."""
    import subprocess
    import sys

    from kernel.router import handlers
    from syscalls.table import TABLE

    resolved = handlers()
    assert set(resolved) == set(TABLE)
    for name, fn in resolved.items():
        assert fn.__module__.startswith("kernel.sys_"), (name, fn.__module__)
    probe = "import sys, syscalls.table, syscalls.codec; print(any(m.startswith('kernel') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
