"""The memory syscalls through the real kernel, real agent processes and the real embedder (WordLlama)
(docs/abi.md, "Memory").  The manager alone is in tests/test_memory.py; attacks in tests/escape/test_memory.py."""
from __future__ import annotations

import json

import pytest

from agentproc import memory
from kernel.testing import KernelProc
from tests.helpers import agent_result

pytestmark = pytest.mark.timeout(180)

NOTES = [
    ("The user's cat is called Miso and is afraid of the vacuum cleaner.", {"kind": "fact"}),
    ("Quarterly report is due on the 14th; send it to Dana in finance.", {"kind": "todo"}),
    ("The staging database password rotates every Monday.", {"kind": "ops"}),
    ("Paris hosted the Olympic Games in 1900, 1924 and 2024.", {"kind": "fact"}),
    ("Prefer short answers with bullet points; the user dislikes long paragraphs.", {"kind": "preference"}),
]

AGENT = """
import json
from agentproc import memory, proc
notes = json.loads(%r)
ids = [memory.add(text, meta) for text, meta in notes]
out = {"ids": ids}
out["get"] = memory.get(ids[1]).text
out["list"] = [e.id for e in memory.list()]
out["facts"] = [e.id for e in memory.list(filter={"kind": "fact"})]
out["pet"] = [h.id for h in memory.search("what animal does the user own?", k=2)]
out["style"] = memory.search("how should replies be formatted", k=1)[0].id
out["keyword"] = memory.search("Dana finance", k=1, mode="keyword")[0].id
out["filtered"] = [h.id for h in memory.search("Olympics", k=5, filter={"kind": "fact"})]
memory.delete(ids[2])
out["after_delete"] = [e.id for e in memory.list()]
out["stats"] = memory.stats()
out["usage"] = proc.self()["usage"]
print("RESULT", json.dumps(out), flush=True)
"""


def test_every_memory_syscall_round_trips_from_an_agent(kernel):
    rec, out = kernel.run(AGENT % json.dumps(NOTES), name="rememberer", timeout=120)
    assert rec["exit_status"] == 0, out
    r = agent_result(out)
    ids = r["ids"]
    assert r["get"] == NOTES[1][0]
    assert r["list"] == ids and r["facts"] == [ids[0], ids[3]]
    assert r["pet"][0] == ids[0], r  # by meaning: no word in common with the note
    assert r["style"] == ids[4] and r["keyword"] == ids[1]
    assert set(r["filtered"]) <= {ids[0], ids[3]} and r["filtered"][0] == ids[3]
    assert r["after_delete"] == [ids[0], ids[1], ids[3], ids[4]]
    assert r["stats"]["usage"]["entries"] == 4
    assert r["usage"]["storage_keys"] == 0  # storage is apart from memory, though they share the quotas


def test_memory_survives_the_agent_and_the_kernel(tmp_path, model_path):
    k = KernelProc(tmp_path)
    try:
        rec, out = k.run("from agentproc import memory\nprint('ID', memory.add('The launch code is 4417.'))",
                         name="keeper")
        assert rec["exit_status"] == 0, out
    finally:
        k.stop()
    k = KernelProc(tmp_path)  # a new kernel on the same state
    try:
        rec, out = k.run("from agentproc import memory\nprint('HIT', memory.search('launch code', k=1)[0].text)",
                         name="keeper")
        assert "HIT The launch code is 4417." in out, out
        assert [e.text for e in memory.list(namespace="keeper", client=k.client)] == ["The launch code is 4417."]
    finally:
        k.stop()


def test_memory_and_storage_share_the_namespace_quota(kernel):
    src = """
from agentproc import memory, storage
from agentproc.errors import EDQUOT
storage.put("a", "x")
storage.put("b", "y")
attempt("third_key", lambda: memory.add("one entry too many"))
storage.delete("b", purge=True)
attempt("fits_now", lambda: memory.add("now it fits") > 0)
attempt("storage_full", lambda: storage.put("c", "z").version)
"""
    from tests.escape.conftest import attack
    rec, results, out = attack(kernel, src, name="sharer", limits={"storage_keys": 2})
    assert results["third_key"] == "DENIED EDQUOT", out
    assert results["fits_now"] == "OK True", out
    assert results["storage_full"] == "DENIED EDQUOT", out
