"""systemd's notify protocol from the real kernel (kernel/sdnotify.py): a fake ``NOTIFY_SOCKET`` receives
``READY=1`` once the kernel serves (model loaded, socket bound), ``STATUS=`` lines, ``WATCHDOG=1`` at half
``WATCHDOG_USEC`` from the event loop, and ``STOPPING=1`` at shutdown."""
from __future__ import annotations

import socket
import time

import pytest

from kernel.testing import KernelProc

pytestmark = pytest.mark.timeout(120)


def test_the_kernel_speaks_sd_notify(tmp_path, model_path, monkeypatch):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify.sock"))
    listener.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping every 0.2 s
    (tmp_path / "k").mkdir()
    k = KernelProc(tmp_path / "k")
    try:
        messages = []

        def until(word: str, timeout: float = 20) -> dict:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                fields = dict(line.split("=", 1) for line in listener.recv(4096).decode().splitlines())
                messages.append(fields)
                if word in fields:
                    return fields
            raise AssertionError(f"no {word} in {messages}")

        ready = until("READY")
        assert ready["READY"] == "1" and "serving" in ready["STATUS"] and int(ready["MAINPID"]) == k.popen.pid
        assert k.client.call("sys.ping") == {"pong": True}  # ready means ready
        t0 = time.monotonic()
        for _ in range(5):
            until("WATCHDOG")
        assert time.monotonic() - t0 < 5
        status = until("STATUS")
        assert "agents" in status["STATUS"] and "tokens/s" in status["STATUS"]
        monkeypatch.delenv("NOTIFY_SOCKET")
        rec, out = k.run("import os; print('NOTIFY_SOCKET' in os.environ)")
        assert out.strip() == "False"  # agents never see it
        k.popen.terminate()
        assert until("STOPPING")["STOPPING"] == "1"
    finally:
        k.stop()
        listener.close()
