"""Attacks on the storage manager (docs/abi.md, "Storage"; docs/storage.md): escaping the namespace through keys,
naming another agent's namespace, evading the quotas, flooding the writer -- and the kernel killed with
SIGKILL under a write load, after which every acknowledged write must be there.
"""
from __future__ import annotations

import random
import time

import pytest

from agentproc import storage
from bench.storage import kill9_round
from kernel.testing import TEST_CONFIG
from tests.escape.conftest import attack, denied

pytestmark = pytest.mark.timeout(240)

TRAVERSAL = """
import json
from agentproc import storage
for name, key in [("dotdot", "../x"), ("absolute", "/etc/passwd"), ("inner", "a/../../b"), ("dot", "./a"),
                  ("double", "a//b"), ("trailing", "a/"), ("nul", "a\\x00b"), ("newline", "a\\nb"),
                  ("backslash", "..\\\\x"), ("deep", "/".join(["d"] * 10000)), ("long", "x" * 5000),
                  ("reserved", ".aiosd/memory/1"), ("symlinkish", "proc/self/root/etc/passwd")]:
    attempt(name, lambda: storage.put(key, "x").version)
attempt("list", lambda: [e.key for e in storage.list()])
"""


def test_keys_cannot_leave_the_namespace(kernel, neighbour):
    rec, results, out = attack(kernel, TRAVERSAL, name="traverser")
    for name in ("dotdot", "absolute", "inner", "dot", "double", "trailing", "nul", "newline", "backslash",
                 "deep", "long", "reserved"):
        assert denied(results, name, "EINVAL"), (name, out)
    # Not a traversal: a key is a name, never resolved on a filesystem.
    assert results["symlinkish"] == "OK 1" and results["list"] == "OK ['proc/self/root/etc/passwd']", out
    neighbour.assert_unharmed()


OTHER_NAMESPACE = """
from agentproc import storage
attempt("get", lambda: storage.get("secret", namespace="victim-ns"))
attempt("put", lambda: storage.put("planted", "x", namespace="victim-ns"))
attempt("list", lambda: list(storage.list(namespace="victim-ns")))
attempt("delete", lambda: storage.delete("secret", namespace="victim-ns", purge=True))
attempt("versions", lambda: storage.versions("secret", namespace="victim-ns"))
attempt("rollback", lambda: storage.rollback("secret", 1, namespace="victim-ns"))
attempt("stat", lambda: storage.stat("secret", namespace="victim-ns"))
"""


def test_another_agents_namespace_is_out_of_reach(kernel, neighbour):
    storage.put("secret", "victim's data", namespace="victim-ns", client=kernel.client)
    rec, results, out = attack(kernel, OTHER_NAMESPACE, name="intruder")
    for name in ("get", "put", "list", "delete", "versions", "rollback", "stat"):
        assert denied(results, name, "EACCES"), (name, out)
    assert storage.get("secret", namespace="victim-ns", client=kernel.client).text == "victim's data"
    assert [e.key for e in storage.list(namespace="victim-ns", client=kernel.client)] == ["secret"]
    neighbour.assert_unharmed()


QUOTA = """
from agentproc import proc, storage
from agentproc.errors import EDQUOT
storage.put("a", b"x" * 600_000)
attempt("over", lambda: storage.put("b", b"y" * 600_000).version)
attempt("parts", lambda: storage.put("c", b"z" * 900_000).version)  # several parts: the quota stops one
attempt("b_absent", lambda: storage.stat("b").version)
attempt("c_absent", lambda: storage.stat("c").version)
attempt("keys", lambda: [storage.put(f"k{i}", "v").version for i in range(10)])
print("USAGE", proc.self()["usage"]["storage_bytes"], proc.self()["usage"]["storage_keys"], flush=True)
"""


def test_quotas_hold_and_nothing_is_half_written(kernel, neighbour):
    rec, results, out = attack(kernel, QUOTA, name="hoarder", limits={"storage_mb": 1, "storage_keys": 5})
    assert denied(results, "over", "EDQUOT") and denied(results, "parts", "EDQUOT"), out
    assert denied(results, "b_absent", "ENOENT") and denied(results, "c_absent", "ENOENT"), out
    assert denied(results, "keys", "EDQUOT"), out
    used = [line for line in out.splitlines() if line.startswith("USAGE")][0].split()
    assert int(used[1]) <= 1 << 20 and int(used[2]) <= 5, out
    neighbour.assert_unharmed()


FLOOD = """
import msgpack, time
from agentproc import client
sock = client.default().sock
for i in range(3000):  # writes queued without waiting for answers
    sock.send(msgpack.packb({"v": 1, "id": i + 1, "call": "storage.put",
                             "args": {"key": f"flood/{i}", "data": b"x" * 1000}}))
codes = {}
while sum(codes.values()) < 3000 and sock.poll(3000):  # answers past its queue bound were dropped: stop
    reply = msgpack.unpackb(sock.recv())
    code = (reply.get("error") or {}).get("code", "ok")
    codes[code] = codes.get(code, 0) + 1
print("CODES", codes, flush=True)
"""


def test_a_write_flood_is_bounded_per_agent_and_others_are_served(kernel, neighbour):
    before = storage.put("probe", "x", namespace="bystander", client=kernel.client).version
    rec, _, out = attack(kernel, FLOOD, name="flooder", limits={"syscall_rate": 1_000_000})
    assert "EAGAIN" in out and "'ok'" in out, out  # at most max_pending in flight, the rest refused at once
    t = time.monotonic()
    storage.put("probe", "y", namespace="bystander", client=kernel.client)
    assert time.monotonic() - t < 5
    assert storage.stat("probe", namespace="bystander", client=kernel.client).version == before + 1
    neighbour.assert_unharmed()


def test_acknowledged_writes_survive_kill_9_of_the_kernel(tmp_path, model_path):
    rng = random.Random(7)
    total = 0
    for _ in range(3):
        acked, lost = kill9_round(tmp_path, TEST_CONFIG, rng)
        assert lost == 0, f"{lost} of {acked} acknowledged writes lost"
        total += acked
    assert total > 30, "the writers hardly wrote: the test measured nothing"
