"""SIGHUP (`aiosctl reload`) re-reads the config (docs/operating.md): groups, [access] and [kernel] limits
apply at once, to new agents' limits and to every caller's privileges, with RELOADING=1 then READY=1 on the
notify socket; a file that does not validate is refused and the running config stays; nothing is dropped."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from kernel.testing import TEST_CONFIG, KernelProc
from tests.conftest import REPO
from tests.escape.conftest import wait_output

pytestmark = pytest.mark.timeout(120)

GROUP = """
[groups.g]
privileges = ["basic", "proc", "llm"]
limits = {{ memory_mb = {memory} }}
"""

WAITER = """
import sys
from agentproc import llm
from agentproc.errors import EPERM
import time
print("READY", flush=True)
time.sleep(3)  # the operator reloads meanwhile
try:
    llm.generate("Hello", max_tokens=2)
    print("LLM allowed", flush=True)
except EPERM:
    print("LLM refused", flush=True)
"""


def test_sighup_reloads_groups_and_refuses_a_bad_file(tmp_path, model_path, monkeypatch):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify.sock"))
    listener.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    (tmp_path / "k").mkdir()
    k = KernelProc(tmp_path / "k", TEST_CONFIG + GROUP.format(memory=300))
    monkeypatch.delenv("NOTIFY_SOCKET")

    def until(word: str) -> dict:
        while True:
            fields = dict(line.split("=", 1) for line in listener.recv(4096).decode().splitlines())
            if word in fields:
                return fields

    def reload() -> None:
        r = subprocess.run([sys.executable, "-m", "agentproc.ctl", "--runtime-dir", str(k.runtime_dir), "reload"],
                           capture_output=True, text=True, timeout=30, cwd=REPO)
        assert r.returncode == 0, r.stderr

    try:
        until("READY")
        before = k.spawn(WAITER, name="before", group="g")["id"]
        wait_output(k, before, "READY")
        text = k.config_path.read_text()
        k.config_path.write_text(text.replace('"proc", "llm"]', '"proc"]').replace("memory_mb = 300",
                                                                                    "memory_mb = 400")
                                 .replace("n_batch = 256", "n_batch = 128")
                                 .replace("max_procs = 32", "max_procs = 32\ntrace_total_mb = 2"))
        reload()
        assert until("RELOADING")["RELOADING"] == "1"
        ready = until("READY")
        assert "reloaded" in ready["STATUS"] and "restart to apply llm" in ready["STATUS"], ready
        after = k.spawn("print('hi')", name="after", group="g")
        assert after["limits"]["memory_mb"] == 400 and k.record(before)["limits"]["memory_mb"] == 300
        k.wait(before, 30)
        assert "LLM refused" in k.output(before)  # the group lost "llm": running agents too
        assert k.client.call("sys.status")["traces"]["total_bytes"] == 2 << 20  # [kernel] applied at once
        k.config_path.write_text(text + "\n[sandbox]\nuid_base = 0\n")
        reload()
        refused = until("READY")
        assert "reload refused" in refused["STATUS"] and "uid_base" in refused["STATUS"]
        assert k.spawn("print('hi')", name="still", group="g")["limits"]["memory_mb"] == 400  # unchanged
        assert "reload refused; the running config stays" in k.log()
        assert k.client.call("sys.ping") == {"pong": True}
    finally:
        k.stop()
        listener.close()
