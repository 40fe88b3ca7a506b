"""The storage syscalls through the real kernel and real agent processes (docs/abi.md, "Storage").  The manager
alone is in tests/test_storage.py; attacks and kill -9 durability in tests/escape/test_storage.py."""
from __future__ import annotations

import pytest

from agentproc import storage
from agentproc.errors import EINVAL, ENOENT
from tests.helpers import agent_result

pytestmark = pytest.mark.timeout(120)

ROUND_TRIP = """
import json
from agentproc import proc, storage
from agentproc.errors import ENOENT, ESTALE
out = {}
v1 = storage.put("notes/today.md", "Paris is the capital of France.")
out["v1"] = v1.version
out["text"] = storage.get("notes/today.md").text
v2 = storage.put("notes/today.md", b"\\x00binary", content_type="application/x-test", if_version=1)
try:
    storage.put("notes/today.md", "lost update", if_version=1)
except ESTALE as e:
    out["stale"] = e.message
out["stat"] = [storage.stat("notes/today.md").version, storage.stat("notes/today.md").versions]
out["old"] = storage.get("notes/today.md", version=1).text
out["list"] = [e.key for e in storage.list("notes/")]
out["rollback"] = storage.rollback("notes/today.md", 1).version
out["after_rollback"] = storage.get("notes/today.md").text
storage.delete("notes/today.md")
try:
    storage.get("notes/today.md")
except ENOENT:
    out["deleted"] = True
out["versions"] = [(v.version, v.deleted) for v in storage.versions("notes/today.md")]
big = bytes(range(256)) * 1200  # 307,200 bytes: several frames each way at max_frame 64 KiB
out["big"] = storage.put("big.bin", big).size
out["big_ok"] = storage.get("big.bin").data == big
out["usage"] = proc.self()["usage"]
print("RESULT", json.dumps(out), flush=True)
"""


def test_every_storage_syscall_round_trips_from_an_agent(kernel):
    rec, out = kernel.run(ROUND_TRIP, name="notes-agent")
    assert rec["exit_status"] == 0, out
    r = agent_result(out)
    assert r["v1"] == 1 and r["text"] == "Paris is the capital of France."
    assert "is at version 2, not 1" in r["stale"]
    assert r["stat"] == [2, 2] and r["old"] == "Paris is the capital of France."
    assert r["list"] == ["notes/today.md"]
    assert r["rollback"] == 3 and r["after_rollback"] == "Paris is the capital of France."
    assert r["deleted"] and r["versions"] == [[4, True], [3, False], [2, False], [1, False]]
    assert r["big"] == 307_200 and r["big_ok"]
    assert r["usage"]["storage_keys"] == 1 and r["usage"]["storage_bytes"] >= 307_200


def test_an_agent_relaunched_under_its_name_finds_its_data(kernel):
    rec, out = kernel.run("from agentproc import storage\nstorage.put('memo', 'kept across runs')",
                          name="relaunched")
    assert rec["exit_status"] == 0, out
    rec, out = kernel.run("from agentproc import storage\nprint('GOT', storage.get('memo').text)",
                          name="relaunched")
    assert "GOT kept across runs" in out, out
    rec, out = kernel.run("from agentproc import storage\nprint('KEYS', [e.key for e in storage.list()])",
                          name="someone-else")
    assert "KEYS []" in out, out


def test_operators_name_a_namespace(kernel):
    client = kernel.client
    storage.put("from-operator.txt", "hello", namespace="ops-ns", client=client)
    assert storage.get("from-operator.txt", namespace="ops-ns", client=client).text == "hello"
    assert [e.key for e in storage.list(namespace="ops-ns", client=client)] == ["from-operator.txt"]
    with pytest.raises(EINVAL, match="namespace"):
        client.call("storage.get", {"key": "from-operator.txt"})
    with pytest.raises(ENOENT):
        storage.get("from-operator.txt", namespace="other-ns", client=client)


def test_aiosctl_storage(kernel, tmp_path, capsysbinary):
    from agentproc import ctl

    value = tmp_path / "v.txt"
    value.write_bytes(b"first")
    base = ["--runtime-dir", str(kernel.runtime_dir), "storage"]
    assert ctl.main(base + ["put", "ctl-ns", "docs/a.txt", "--file", str(value)]) == 0
    value.write_bytes(b"second")
    assert ctl.main(base + ["put", "ctl-ns", "docs/a.txt", "--file", str(value), "--if-version", "1"]) == 0
    assert b"docs/a.txt v2 6 bytes" in capsysbinary.readouterr().out
    assert ctl.main(base + ["ls", "ctl-ns"]) == 0
    assert capsysbinary.readouterr().out.startswith(b"docs/a.txt\tv2\t6\t")
    assert ctl.main(base + ["rollback", "ctl-ns", "docs/a.txt", "--version", "1"]) == 0
    capsysbinary.readouterr()
    assert ctl.main(base + ["get", "ctl-ns", "docs/a.txt"]) == 0
    assert capsysbinary.readouterr().out == b"first"
    assert ctl.main(base + ["versions", "ctl-ns", "docs/a.txt"]) == 0
    assert [line.split(b"\t")[0] for line in capsysbinary.readouterr().out.splitlines()] == [b"v3", b"v2", b"v1"]
    assert ctl.main(base + ["put", "ctl-ns", "docs/a.txt", "--file", str(value), "--if-version", "1"]) == 1
    assert b"ESTALE" in capsysbinary.readouterr().err
