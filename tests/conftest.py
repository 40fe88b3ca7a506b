"""Fixtures that run the real thing: an ``aiosd`` kernel process on the real model, real agent processes.

Every process a test starts is bounded in time and cleaned up: kernels get SIGTERM then SIGKILL, and agents
die with their kernel.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agentproc.client import Client
from kernel.llm.model import ensure_default_model
from syscalls import codec

REPO = Path(__file__).resolve().parent.parent
STATE_DIR = Path(os.environ.get("AIOSD_STATE_DIR", REPO / ".state"))

# Small and quick: tests check behaviour, not capacity.
TEST_CONFIG = """
[kernel]
max_frame = 65536
max_procs = 32

[llm]
n_ctx_seq = 1024
n_seq_max = 4
n_batch = 256
"""


class KernelProc:
    """A running ``aiosd`` process and helpers to talk to it as an operator."""

    def __init__(self, tmp: Path, config: str = TEST_CONFIG, preexec_fn=None):
        """``preexec_fn``: run in the kernel's process before it starts (e.g. to lower an rlimit)."""
        self.runtime_dir = tmp / "run"
        self.config_path = tmp / "aiosd.toml"
        if "[storage]" not in config:  # each test kernel its own databases: tests never see each other's data
            config += f'\n[storage]\npath = "{tmp / "storage.db"}"\n'
        if "[memory]" not in config:
            config += f'\n[memory]\npath = "{tmp / "memory.db"}"\n'
        if "[access]" not in config:
            config += f'\n[access]\npath = "{tmp}"\n'
        self.config_path.write_text(config)
        self.log_path = tmp / "aiosd.log"
        self.endpoint = codec.endpoint(str(self.runtime_dir))
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "kernel.main", "--runtime-dir", str(self.runtime_dir),
             "--state-dir", str(STATE_DIR), "--config", str(self.config_path), "--log-level", "INFO"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO, preexec_fn=preexec_fn,
        )
        self._clients: list[Client] = []
        self.client = None  # made once the socket exists: the operator key is written before it
        try:
            self._wait_ready(timeout=60)
        except BaseException:
            self.stop()  # an open ZeroMQ context would hang pytest at exit
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        sock = self.runtime_dir / codec.SOCKET_NAME
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"aiosd exited with {self.popen.returncode}:\n{self.log()}")
            if sock.exists():
                if self.client is None:
                    self.client = self.new_client()
                try:
                    self.client.call("sys.ping", timeout=1.0)
                    return
                except Exception:  # not up yet, or a killed kernel's socket and key still lie there:
                    self._clients.remove(self.client)  # read the key again next time
                    self.client.close()
                    self.client = None
            time.sleep(0.05)
        raise RuntimeError(f"aiosd did not become ready in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def new_client(self, timeout: float = 30.0, routing_id: bytes | None = None) -> Client:
        c = Client(self.endpoint, timeout=timeout, routing_id=routing_id)
        self._clients.append(c)
        return c

    def spawn(self, source: str, *, name: str | None = None, group: str = "default", argv=()) -> dict:
        args = {"source": textwrap.dedent(source), "group": group, "argv": list(argv)}
        if name:
            args["name"] = name
        return self.client.call("proc.spawn", args)

    def record(self, pid_: int) -> dict:
        for p in self.client.call("proc.list")["procs"]:
            if p["id"] == pid_:
                return p
        raise KeyError(pid_)

    def wait(self, pid_: int, timeout: float = 60.0) -> dict:
        """The record of process ``pid_`` once it has ended (fails the test after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = self.record(pid_)
            if rec["state"] in ("EXITED", "KILLED"):
                return rec
            time.sleep(0.05)
        raise AssertionError(f"process {pid_} still {rec['state']} after {timeout} s")

    def output(self, pid_: int) -> str:
        return self.client.call("proc.logs", {"id": pid_})["output"]

    def run(self, source: str, timeout: float = 60.0, **kw) -> tuple[dict, str]:
        """Spawn an agent, wait for it to end; return its final record and its output."""
        rec = self.wait(self.spawn(source, **kw)["id"], timeout)
        return rec, self.output(rec["id"])

    def stop(self, timeout: float = 15.0, drain: bool = False) -> int:
        """SIGTERM the kernel -- twice, so that it does not drain, unless ``drain`` -- and wait; SIGKILL past
        ``timeout``.  Returns its exit status."""
        for c in self._clients:
            try:
                c.close()
            except Exception:
                pass
        self._clients.clear()
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            if not drain:
                time.sleep(0.05)  # two signals in a row may be delivered as one
                if self.popen.poll() is None:
                    self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode


@pytest.fixture(scope="session")
def model_path() -> str:
    return str(ensure_default_model(STATE_DIR))


@pytest.fixture(scope="session")
def kernel(tmp_path_factory, model_path):
    """One kernel shared by the tests that do not stop it."""
    k = KernelProc(tmp_path_factory.mktemp("kernel"))
    yield k
    k.stop()


@pytest.fixture
def fresh_kernel(tmp_path, model_path):
    """A kernel of the test's own, for tests that shut it down or break it."""
    k = KernelProc(tmp_path)
    yield k
    k.stop()


def pid_gone(pid: int, timeout: float = 10.0) -> bool:
    """True once ``pid`` no longer exists (a zombie counts as gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.05)
    return False
