"""The escape suite: hostile agents launched through the real kernel, each attack denied or contained.

Every test spawns an attacker (``attack``) next to a ``neighbour`` agent, then checks that the attempt failed,
that the neighbour is unharmed and that the kernel still serves.  Attackers print one line per attempt
(``NAME OK result`` or ``NAME DENIED errno``) through the ``PRELUDE`` helpers.  A test whose defence needs a
layer this machine does not have is skipped with that layer's reason (from a probe agent's attested layers),
before it attacks.
"""
from __future__ import annotations

import contextlib
import os
import signal
import textwrap
import time
from pathlib import Path

import pytest

from kernel.testing import pid_gone  # noqa: F401  (re-exported for the tests)

SECRET = "neighbour-secret-4f1c"

PRELUDE = '''
import ctypes, os, sys
def attempt(name, fn):
    try:
        print(name, "OK", fn(), flush=True)
    except OSError as e:
        print(name, "DENIED", e.errno, flush=True)
    except Exception as e:
        print(name, "DENIED", type(e).__name__, flush=True)
_libc = ctypes.CDLL(None, use_errno=True)
def raw(nr, *args):
    """A raw syscall: (return value, errno)."""
    ctypes.set_errno(0)
    return _libc.syscall(nr, *args), ctypes.get_errno()
'''

NEIGHBOUR = f"""
import time
from agentproc import ping
with open("secret.txt", "w") as f:
    f.write({SECRET!r})
ping()
print("ready", flush=True)
while True:
    ping()
    time.sleep(0.1)
"""


def spawn(kernel, source: str, *, group: str = "default", limits: dict | None = None, name: str | None = None,
          argv=(), prelude: bool = True, **more) -> dict:
    """``more``: further proc.spawn arguments (``venv``, ``trace``...)."""
    args = {"source": (PRELUDE if prelude else "") + textwrap.dedent(source), "group": group,
            "argv": [str(a) for a in argv], **more}
    if limits:
        args["limits"] = limits
    if name:
        args["name"] = name
    return kernel.client.call("proc.spawn", args)


def attack(kernel, source: str, *, timeout: float = 60, **kw) -> tuple[dict, dict, str]:
    """Run an attacker to its end: (record, {attempt: "OK ..." | "DENIED ..."}, output)."""
    rec = kernel.wait(spawn(kernel, source, **kw)["id"], timeout)
    out = kernel.output(rec["id"])
    return rec, parse(out), out


def parse(out: str) -> dict:
    results = {}
    for line in out.splitlines():
        name, _, rest = line.partition(" ")
        if rest.startswith(("OK", "DENIED")):
            results[name] = rest
    return results


def denied(results: dict, name: str, errno_: int | None = None) -> bool:
    got = results.get(name, "missing")
    return got.startswith("DENIED") and (errno_ is None or got == f"DENIED {errno_}")


def wait_output(kernel, pid_: int, text: str, timeout: float = 30) -> str:
    return kernel.wait_output(pid_, text, timeout)


def kill(kernel, pid_: int) -> dict:
    kernel.client.call("proc.kill", {"id": pid_})
    return kernel.wait(pid_, 30)


class Neighbour:
    """A well-behaved agent next to the attacker: it keeps a secret in its scratch and keeps calling."""

    def __init__(self, kernel):
        self.kernel = kernel
        rec = spawn(kernel, NEIGHBOUR, name="neighbour", prelude=False)
        self.id, self.pid = rec["id"], rec["pid"]
        self.scratch = Path(kernel.runtime_dir) / "scratch" / str(self.id)
        self.secret = self.scratch / "secret.txt"
        wait_output(kernel, self.id, "ready")

    def assert_unharmed(self) -> None:
        k = self.kernel
        assert k.client.call("sys.ping") == {"pong": True}
        rec = k.record(self.id)
        assert rec["state"] == "RUNNING", rec
        assert self.secret.read_text() == SECRET
        before = rec["usage"]["syscalls"]
        deadline = time.monotonic() + 10
        while k.record(self.id)["usage"]["syscalls"] <= before:  # it is still being served
            assert time.monotonic() < deadline, "the neighbour is no longer served"
            time.sleep(0.05)


@contextlib.contextmanager
def neighbour_of(kernel):
    """A ``Neighbour`` on ``kernel`` for the duration of the block (for kernels other than the session's)."""
    n = Neighbour(kernel)
    try:
        yield n
    finally:
        if kernel.record(n.id)["state"] in ("STARTING", "RUNNING"):
            kill(kernel, n.id)


@pytest.fixture
def neighbour(kernel):
    with neighbour_of(kernel) as n:
        yield n


@pytest.fixture(scope="session")
def layers(shared_kernel) -> dict:
    """The layers a default-group agent gets on this machine, as its bootstrap attested them."""
    kernel = shared_kernel
    rec = kernel.wait(spawn(kernel, "pass", name="layer-probe", prelude=False)["id"], 60)
    assert rec["exit_status"] == 0, kernel.output(rec["id"])
    return rec["layers"]


def need(layers: dict, *names: str) -> None:
    """Skip (before attacking) unless every named layer is on for agents on this machine."""
    for name in names:
        status = layers.get(name, "off: not reported by the bootstrap")
        if not status.startswith("on"):
            pytest.skip(f"layer {name} is {status}")


def landlock_abi(layers: dict) -> int:
    status = layers.get("landlock", "")
    if status.startswith("on: ABI "):
        return int(status.split()[2].rstrip(","))
    return 0


def force_gone(pids) -> None:
    """Cleanup for a failed containment test: SIGKILL whatever is left."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
