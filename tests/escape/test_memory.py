"""Attacks on the memory manager (docs/abi.md, "Memory"): reading or planting another agent's memories (by
namespace or by guessing entry ids), oversized and malformed entries, and a flood of searches that would keep
the memory worker from serving anyone else.
"""
from __future__ import annotations

import time

import pytest

from agentproc import memory
from tests.escape.conftest import attack, denied

pytestmark = pytest.mark.timeout(240)

INTRUDER = """
from agentproc import memory
ids = [int(a) for a in sys.argv[1:]]
attempt("search", lambda: memory.search("secret", namespace="victim-mem"))
attempt("add", lambda: memory.add("planted", namespace="victim-mem"))
attempt("list", lambda: list(memory.list(namespace="victim-mem")))
attempt("stats", lambda: memory.stats(namespace="victim-mem"))
for i in ids:  # the victim's entry ids, as if guessed: they are not in this agent's namespace
    attempt(f"get{i}", lambda: memory.get(i).text)
    attempt(f"delete{i}", lambda: memory.delete(i))
attempt("own_search", lambda: [h.text for h in memory.search("secret launch code")])
"""


def test_another_agents_memories_are_out_of_reach(kernel, neighbour):
    ids = [memory.add("The secret launch code is 0000.", namespace="victim-mem", client=kernel.client),
           memory.add("The victim's diary entry.", namespace="victim-mem", client=kernel.client)]
    rec, results, out = attack(kernel, INTRUDER, name="mem-intruder", argv=ids)
    for name in ("search", "add", "list", "stats"):
        assert denied(results, name, "EACCES"), (name, out)
    for i in ids:
        assert denied(results, f"get{i}", "ENOENT") and denied(results, f"delete{i}", "ENOENT"), out
    assert results["own_search"] == "OK []", out
    assert [e.id for e in memory.list(namespace="victim-mem", client=kernel.client)] == ids
    neighbour.assert_unharmed()


MALFORMED = """
from agentproc import memory
attempt("empty", lambda: memory.add(""))
attempt("nul", lambda: memory.add("a\\x00b"))
attempt("huge", lambda: memory.add("x" * 70000))
attempt("meta_nested", lambda: memory.add("t", {"a": {"b": [1, 2]}}))
attempt("meta_many", lambda: memory.add("t", {f"k{i}": i for i in range(40)}))
attempt("meta_nan", lambda: memory.add("t", {"x": float("nan")}))
attempt("k_zero", lambda: memory.search("q", k=0))
attempt("bad_mode", lambda: memory.search("q", mode="sql"))
attempt("long_query", lambda: memory.search("q" * 5000))
"""


def test_malformed_entries_are_refused_with_the_rule(kernel, neighbour):
    rec, results, out = attack(kernel, MALFORMED, name="mem-malformed")
    assert denied(results, "huge", "E2BIG"), out
    for name in ("empty", "nul", "meta_nested", "meta_many", "meta_nan", "k_zero", "bad_mode", "long_query"):
        assert denied(results, name, "EINVAL"), (name, out)
    neighbour.assert_unharmed()


FLOOD = """
import msgpack
from agentproc import client, memory
for i in range(300):
    memory.add(f"note {i} about topic {i % 17} and the weather in city {i % 5}")
sock = client.default().sock
for i in range(2000):  # searches queued without reading the answers
    sock.send(msgpack.packb({"v": 1, "id": i + 1, "call": "memory.search",
                             "args": {"query": f"weather in city {i % 5}", "k": 10}}))
codes = {}
while sum(codes.values()) < 2000 and sock.poll(3000):
    reply = msgpack.unpackb(sock.recv())
    code = (reply.get("error") or {}).get("code", "ok")
    codes[code] = codes.get(code, 0) + 1
print("CODES", codes, flush=True)
"""


def test_a_search_flood_is_bounded_and_others_are_served(kernel, neighbour):
    memory.add("bystander's note", namespace="mem-bystander", client=kernel.client)
    rec, _, out = attack(kernel, FLOOD, name="mem-flooder", limits={"syscall_rate": 1_000_000}, timeout=120)
    assert "EAGAIN" in out and "'ok'" in out, out
    t = time.monotonic()
    hits = memory.search("note", namespace="mem-bystander", client=kernel.client)
    assert [h.text for h in hits] == ["bystander's note"] and time.monotonic() - t < 5
    neighbour.assert_unharmed()
