"""The access manager (docs/abi.md, "Access"; kernel/access.py): another agent's data only by grant, grants only
by the owner, destructive operations waiting for an operator, and an audit log whose tampering is detected.
Real kernel, real agents.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from agentproc import storage
from kernel.testing import TEST_CONFIG, KernelProc
from tests.conftest import REPO
from tests.escape.conftest import attack, denied, spawn, wait_output

pytestmark = pytest.mark.timeout(180)

OWNER = """
from agentproc import access, memory, storage
storage.put("notes/a.md", "researcher's note")
storage.put("private/diary", "not for you")
memory.add("the researcher remembers this")
g = access.grant("reader", mode="read", prefix="notes/")
print("GRANT", g["id"], flush=True)
"""

READER = """
from agentproc import storage, memory
attempt("read_note", lambda: storage.get("notes/a.md", namespace="researcher").text)
attempt("list_notes", lambda: [e.key for e in storage.list("notes/", namespace="researcher")])
attempt("read_private", lambda: storage.get("private/diary", namespace="researcher").text)
attempt("list_all", lambda: [e.key for e in storage.list(namespace="researcher")])
attempt("write_note", lambda: storage.put("notes/a.md", "defaced", namespace="researcher").version)
attempt("memory", lambda: [h.text for h in memory.search("remembers", namespace="researcher")])
attempt("grant_self", lambda: __import__("agentproc").access.grant("reader", mode="read-write"))
attempt("revoke", lambda: __import__("agentproc").access.revoke(int(sys.argv[1])))
"""


def test_another_namespace_only_by_grant_and_never_after_the_revoke(kernel, neighbour):
    rec, out = kernel.run(OWNER, name="researcher")
    assert rec["exit_status"] == 0, out
    grant_id = int(out.split("GRANT ")[1].split()[0])
    _, before, out0 = attack(kernel, READER, name="stranger", argv=[grant_id])
    assert denied(before, "read_note", "EACCES") and denied(before, "list_notes", "EACCES"), out0
    _, r, out = attack(kernel, READER, name="reader", argv=[grant_id])
    notes = [e.key for e in storage.list("notes/", namespace="researcher", client=kernel.client)]  # all it may list
    assert r["read_note"] == "OK researcher's note" and r["list_notes"] == f"OK {notes}", out
    for name in ("read_private", "list_all", "write_note", "memory"):  # outside the prefix, or a write
        assert denied(r, name, "EACCES"), (name, out)
    assert denied(r, "grant_self", "EINVAL"), out  # its own namespace needs no grant; it can give no other
    assert denied(r, "revoke", "ENOENT"), out  # not its grant to revoke
    assert storage.get("notes/a.md", namespace="researcher", client=kernel.client).text == "researcher's note"
    rec, out = kernel.run(f"from agentproc import access\naccess.revoke({grant_id})", name="researcher")
    assert rec["exit_status"] == 0, out
    _, after, out = attack(kernel, READER, name="reader", argv=[grant_id])
    assert denied(after, "read_note", "EACCES"), out
    neighbour.assert_unharmed()


def test_a_group_grant_with_write(kernel):
    kernel.run("""
from agentproc import access, memory
memory.add("shared board entry")
access.grant("group:default", mode="read-write")
""", name="board")
    _, r, out = attack(kernel, """
from agentproc import memory, storage
attempt("search", lambda: [h.text for h in memory.search("board entry", namespace="board")])
attempt("write", lambda: storage.put("from-member", "hi", namespace="board").version)
""", name="member")
    assert r["search"] == "OK ['shared board entry']" and r["write"] == "OK 1", out
    _, r, out = attack(kernel, """
from agentproc import storage
attempt("write", lambda: storage.put("from-outsider", "hi", namespace="board").version)
""", name="outsider", group="untrusted")
    assert denied(r, "write", "EACCES"), out


def ctl(kernel, *args, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentproc.ctl", "--runtime-dir", str(kernel.runtime_dir), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture
def confirming(tmp_path, model_path):
    k = KernelProc(tmp_path, TEST_CONFIG + '\n[access]\nconfirm = ["delete", "cross_write"]\n'
                                          f'confirm_timeout_s = 3\npath = "{tmp_path}"\n')
    yield k
    k.stop()


DELETER = """
from agentproc import storage
storage.put("k1", "one")
storage.put("k2", "two")
storage.put("k3", "three")
print("READY", flush=True)
for key in ("k1", "k2", "k3"):
    attempt(key, lambda: storage.delete(key)["deleted"])
"""


def test_destructive_calls_wait_for_an_operator(confirming):
    k = confirming
    agent = spawn(k, DELETER, name="deleter")["id"]
    wait_output(k, agent, "READY")

    def waiting_one() -> dict:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pending = k.client.call("access.pending")["pending"]
            if pending:
                return pending[0]
            time.sleep(0.05)
        raise AssertionError("nothing waits for confirmation")

    first = waiting_one()
    assert "k1" in first["what"] and "a delete" in first["why"] and "deleter" in first["who"]
    assert str(first["id"]) in ctl(k, "pending").stdout
    assert ctl(k, "approve", str(first["id"])).returncode == 0
    second = waiting_one()
    assert "k2" in second["what"]
    assert ctl(k, "deny", str(second["id"])).returncode == 0
    waiting_one()  # k3: nobody answers; it times out after 3 s
    rec = k.wait(agent, 30)
    out = k.output(agent)
    assert "k1 OK True" in out and "k2 DENIED EACCES" in out and "k3 DENIED EACCES" in out, out
    assert rec["exit_status"] == 0
    assert [v.deleted for v in storage.versions("k1", namespace="deleter", client=k.client)][0]
    assert storage.get("k2", namespace="deleter", client=k.client).text == "two"
    audit = ctl(k, "audit", "--json").stdout.splitlines()
    decisions = [(json.loads(line)["what"], json.loads(line)["decision"]) for line in audit]
    assert ("storage.delete 'k1' in 'deleter'", "approved") in decisions
    assert ("storage.delete 'k2' in 'deleter'", "denied") in decisions
    assert ("storage.delete 'k3' in 'deleter'", "timed out") in decisions


def test_the_audit_log_detects_an_edited_or_removed_record(kernel, tmp_path):
    kernel.run("""
from agentproc import access
g = access.grant("someone", mode="read")
access.revoke(g["id"])
""", name="auditee")
    attack(kernel, "from agentproc import storage\nattempt('x', lambda: storage.get('a', namespace='auditee'))",
           name="snoop")
    path = kernel.client.call("sys.status")["audit_log"]
    kernel.client.call("sys.ping")
    result = ctl(kernel, "audit", "--verify")
    assert result.returncode == 0 and "chain intact" in result.stdout, result
    lines = open(path).read().splitlines()
    assert any('"decision":"denied"' in line and "snoop" in line for line in lines)
    edited = tmp_path / "edited.log"
    edited.write_text("\n".join(line.replace('"decision":"denied"', '"decision":"allowed"') for line in lines) + "\n")
    result = ctl(kernel, "audit", "--verify", "--file", str(edited))
    assert result.returncode == 1 and "was edited" in result.stdout, result.stdout
    removed = tmp_path / "removed.log"
    removed.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    result = ctl(kernel, "audit", "--verify", "--file", str(removed))
    assert result.returncode == 1 and "does not follow" in result.stdout, result.stdout


def test_a_flood_of_refused_calls_does_not_flood_the_audit_log(kernel):
    path = kernel.client.call("sys.status")["audit_log"]
    before = len(open(path).read().splitlines())
    rec, results, out = attack(kernel, """
from agentproc import storage
n = 0
for i in range(600):
    try:
        storage.get("x", namespace="someone-else")
    except Exception:
        n += 1
print("REFUSED", n, flush=True)
""", name="audit-flooder", limits={"syscall_rate": 100_000})
    assert "REFUSED 600" in out, out
    time.sleep(1.5)  # the suppressed count is written once its one-second window has passed
    lines = [json.loads(line) for line in open(path).read().splitlines()[before:]]
    mine = [r for r in lines if "audit-flooder" in r["who"]]
    assert len(mine) < 200, len(mine)  # 20 a second at most, not 600
    denied_, counted = sum(r["decision"] == "denied" for r in mine), sum(
        r["detail"].get("count", 0) + r["detail"].get("suppressed", 0) for r in mine)
    assert denied_ + counted == 600, (denied_, counted)  # every refusal is in the log, most as a count
    assert ctl(kernel, "audit", "--verify").returncode == 0
