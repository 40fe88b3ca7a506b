"""The test kit: run a real ``aiosd`` kernel on the real model, spawn agents into it, talk to it raw.

For people testing their own agents (docs/testing.md) and for the project's own tests, benchmarks and
examples.  The pytest fixtures built on it are in ``kernel.pytest_plugin``; this module needs no pytest.

- ``KernelProc``: an ``aiosd`` process in a temporary directory, with an operator ``client``, agent spawning
  (``spawn``, ``spawn_file``, ``run``), waiting (``wait``, ``wait_output``) and ``stop``.
- ``RawClient``: a bare ZeroMQ connection that sends arbitrary frames (valid or not) and reads the kernel's
  answers undecoded by the SDK -- for tests of the ABI itself.
- ``Trace``: an agent's syscall trace (docs/abi.md, "Syscall traces") to assert on, save, load, replay
  against a kernel and compare with another run's (record and replay for regression tests).
- ``config_text``: a config file's text from a base plus overrides (groups, limits, sections).
- ``eventually`` and ``pid_gone``: waits bounded in time.
- ``LlamaServer`` and ``FaultProxy``: llama-cpp-python's OpenAI-compatible server on loopback, and a relay in
  front of it that makes it slow, answer 500, vanish or die mid-answer (for remote cores: docs/remote.md).

Every process this module starts is bounded in time and cleaned up: a kernel gets SIGTERM, then SIGKILL after
a timeout, and its agents die with it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import json
import time
import tomllib
from pathlib import Path
from typing import Any, Callable

import msgpack

from agentproc.client import Client
from syscalls.address import SOCKET_NAME, endpoint, operator_routing_id

# The directory holding the ``kernel`` package: the kernel started by ``KernelProc`` runs this very code.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent

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

ENDED = ("EXITED", "KILLED", "LOST")


def state_dir() -> Path:
    """Where kernels started by the kit keep the assembled model: ``$AIOSD_STATE_DIR``, else the kernel's
    default (``$XDG_STATE_HOME/aiosd`` or ``~/.local/state/aiosd``).  Read at each call, so a conftest may set
    the variable before the first kernel starts."""
    from kernel.models import default_state_dir

    return Path(default_state_dir())


def model_path() -> str:
    """The embedded default model, assembled into ``state_dir()`` on first use (seconds, once)."""
    from kernel.models import ensure_default_model

    return str(ensure_default_model(state_dir()))


# --- config text ---------------------------------------------------------------------------------------


def config_text(base: str = TEST_CONFIG, **sections: dict) -> str:
    """``base`` (TOML text) with ``sections`` merged over it, as TOML text.

    Each keyword is a section: ``kernel={"max_procs": 4}`` sets keys of ``[kernel]``; for sections of named
    tables give one dict per name: ``groups={"tester": {"privileges": ["basic", "llm"], "limits":
    {"memory_mb": 256}}}`` becomes ``[groups.tester]`` with ``limits`` as an inline table.  A key given here
    replaces the base's value (tables merge key by key).  Raises ``ValueError`` for a value TOML cannot hold.
    """
    merged = tomllib.loads(base)
    for name, values in sections.items():
        _merge(merged.setdefault(name, {}), values)
    return dumps_toml(merged)


def _merge(into: dict, values: dict) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def dumps_toml(doc: dict) -> str:
    """A config document (sections of keys, or sections of named tables) as TOML text: the inverse of
    ``tomllib.loads`` for the shapes aiosd's config has."""
    out: list[str] = []
    for section, body in doc.items():
        scalars = {k: v for k, v in body.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in body.items() if isinstance(v, dict)}
        if scalars or not tables:
            out.append(f"[{section}]")
            out += [f"{_key(k)} = {_value(v)}" for k, v in scalars.items()]
            out.append("")
        for name, table in tables.items():
            out.append(f"[{section}.{_key(name)}]")
            out += [f"{_key(k)} = {_value(v)}" for k, v in table.items()]
            out.append("")
    return "\n".join(out)


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _value(key)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }"
    raise ValueError(f"config value {v!r}: TOML holds strings, numbers, booleans, lists and tables")


# --- waiting -------------------------------------------------------------------------------------------


def eventually(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> Any:
    """Call ``check`` until it returns something true; return that.  Raises AssertionError (naming ``what``)
    after ``timeout`` seconds; exceptions from ``check`` propagate."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true after {timeout} s: {what or check}")
        time.sleep(interval)


def pid_gone(pid: int, timeout: float = 10.0) -> bool:
    """True once ``pid`` no longer exists (a zombie counts as gone); False after ``timeout``."""
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


# --- a raw client --------------------------------------------------------------------------------------


class RawClient:
    """A bare DEALER connection to a kernel: ``send`` any frames, ``recv`` the decoded answers.

    ``operator=True`` presents the operator credential (readable by the kernel's user only); False connects
    as an anonymous peer (the kernel answers it EACCES: docs/abi.md section 1).
    ``routing_id`` forces an identity of your choosing (to test forgery).  Close it (or use ``with``)."""

    def __init__(self, endpoint: str, *, operator: bool = True, routing_id: bytes | None = None):
        import zmq

        self.endpoint = endpoint
        self._ctx = zmq.Context()
        self.sock = self._ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if routing_id is None and operator:
            routing_id = operator_routing_id(endpoint)
        if routing_id is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        self.sock.connect(endpoint)
        self._next_id = 1

    def send(self, *frames: bytes) -> None:
        """Send one message of ``frames`` (bytes, exactly as given: malformed ones too)."""
        self.sock.send_multipart(list(frames))

    def recv(self, timeout: float = 10.0) -> Any:
        """The next answer, msgpack-decoded.  Raises AssertionError if none comes within ``timeout`` s."""
        assert self.sock.poll(int(timeout * 1000)), f"no answer from the kernel in {timeout} s"
        return msgpack.unpackb(self.sock.recv(), raw=False)

    def ask(self, obj: Any, timeout: float = 10.0) -> Any:
        """Send ``obj`` packed with msgpack as one frame; return the answer (the whole reply envelope)."""
        self.send(msgpack.packb(obj))
        return self.recv(timeout)

    def request(self, call: str, args: dict | None = None, *, v: int = 1, timeout: float = 10.0) -> dict:
        """Send a well-formed request envelope (docs/abi.md 2.1) with a fresh id; return the reply envelope
        (``{"ok": True, "result": ...}`` or ``{"ok": False, "error": {...}}``), not raising on errors.  Chunks
        of a streamed answer are read past; the reply then carries ``"chunks": [data, ...]``."""
        rid, self._next_id = self._next_id, self._next_id + 1
        msg = {"v": v, "id": rid, "call": call}
        if args is not None:
            msg["args"] = args
        reply = self.ask(msg, timeout)
        chunks = []
        while isinstance(reply, dict) and "chunk" in reply and reply.get("id") == rid:
            chunks.append(reply["chunk"])
            reply = self.recv(timeout)
        if chunks:
            reply["chunks"] = chunks
        return reply

    def close(self) -> None:
        """Close the connection (again: nothing)."""
        if not self.sock.closed:
            self.sock.close()
            self._ctx.term()

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- a kernel ------------------------------------------------------------------------------------------


class KernelProc:
    """A running ``aiosd`` process in directory ``tmp`` and helpers to talk to it as an operator.

    Its runtime dir, state dir (process table, and by default storage, memory and grants) and config are under
    ``tmp``; a second one on the same ``tmp`` is the same kernel restarted (``restarted``).  ``config``: the config file's text (``TEST_CONFIG`` by default; see ``config_text``).  Unless it has its
    own ``[storage]``, ``[memory]`` and ``[access]`` sections, their files go under ``tmp``: each kernel its
    own data.  ``preexec_fn`` runs in the kernel's process before it starts (e.g. to lower an rlimit);
    ``args``: more ``aiosd`` arguments; ``env``: more environment variables for it.
    The constructor returns once the kernel answers ``sys.ping`` (RuntimeError with its log if it does not
    within ``ready_timeout`` s).  Always ``stop()`` it."""

    def __init__(self, tmp: Path, config: str = TEST_CONFIG, preexec_fn=None, *, ready_timeout: float = 60.0,
                 args=(), env: dict | None = None):
        tmp = Path(tmp)
        self.tmp, self.config_text, self._preexec_fn, self._args, self._env = tmp, config, preexec_fn, args, env
        self.runtime_dir = tmp / "run"
        self.state_dir = tmp / "state"
        self.config_path = tmp / "aiosd.toml"
        if "[storage]" not in config:  # each test kernel its own databases: tests never see each other's data
            config += f'\n[storage]\npath = "{tmp / "storage.db"}"\n'
        if "[memory]" not in config:
            config += f'\n[memory]\npath = "{tmp / "memory.db"}"\n'
        if "[access]" not in config:
            config += f'\n[access]\npath = "{tmp}"\n'
        self.config_path.write_text(config)
        self.log_path = tmp / "aiosd.log"
        self.endpoint = endpoint(str(self.runtime_dir))
        self._log = open(self.log_path, "ab")  # a restarted kernel's log follows the earlier one's
        # The embedded model, shared by every kit kernel, unless the config names its own.
        model = [] if tomllib.loads(config).get("llm", {}).get("model") else ["--model", model_path()]
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "kernel.main", "--runtime-dir", str(self.runtime_dir),
             "--state-dir", str(self.state_dir), *model, "--config", str(self.config_path), "--log-level", "INFO",
             *args],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=PACKAGE_ROOT, preexec_fn=preexec_fn,
            env=dict(os.environ, **env) if env else None,
        )
        self._clients: list[Client] = []
        self._raws: list[RawClient] = []
        self.client = None  # made once the socket exists: the operator key is written before it
        try:
            self._wait_ready(timeout=ready_timeout)
        except BaseException:
            self.stop()  # an open ZeroMQ context would hang pytest at exit
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        sock = self.runtime_dir / SOCKET_NAME
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
        """The last 5000 characters of the kernel's log."""
        return self.log_path.read_text(errors="replace")[-5000:]

    def new_client(self, timeout: float = 30.0, routing_id: bytes | None = None) -> Client:
        """Another SDK client (the operator's unless ``routing_id``), closed by ``stop``."""
        c = Client(self.endpoint, timeout=timeout, routing_id=routing_id)
        self._clients.append(c)
        return c

    def raw_client(self, *, operator: bool = True, routing_id: bytes | None = None) -> RawClient:
        """A ``RawClient`` to this kernel, closed by ``stop``."""
        r = RawClient(self.endpoint, operator=operator, routing_id=routing_id)
        self._raws.append(r)
        return r

    def spawn(self, source: str, *, name: str | None = None, group: str = "default", argv=(),
              limits: dict | None = None, **more) -> dict:
        """``proc.spawn`` an agent from Python ``source`` (dedented); returns the kernel's answer (``id``,
        ``pid``...).  ``more``: further proc.spawn arguments (docs/abi.md), e.g. ``trace=True``."""
        args = {"source": textwrap.dedent(source), "group": group, "argv": [str(a) for a in argv], **more}
        if name:
            args["name"] = name
        if limits:
            args["limits"] = limits
        return self.client.call("proc.spawn", args)

    def spawn_file(self, path: str | os.PathLike, **kw) -> dict:
        """``spawn`` the agent in file ``path`` (named after the file unless ``name`` is given)."""
        path = Path(path)
        kw.setdefault("name", path.stem)
        return self.spawn(path.read_text(), **kw)

    def record(self, agent_id: int) -> dict:
        """The process table's record of agent ``agent_id`` (KeyError if there is none)."""
        for p in self.client.call("proc.list")["procs"]:
            if p["id"] == agent_id:
                return p
        raise KeyError(agent_id)

    def wait(self, agent_id: int, timeout: float = 60.0) -> dict:
        """The record of agent ``agent_id`` once it has ended (AssertionError after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = self.record(agent_id)
            if rec["state"] in ENDED:
                return rec
            time.sleep(0.05)
        raise AssertionError(f"process {agent_id} still {rec['state']} after {timeout} s")

    def output(self, agent_id: int) -> str:
        """What the agent has printed so far (stdout and stderr)."""
        return self.client.call("proc.logs", {"id": agent_id})["output"]

    def wait_output(self, agent_id: int, text: str, timeout: float = 30.0) -> str:
        """The agent's output once it contains ``text`` (AssertionError, with the output, if the agent ends
        or ``timeout`` passes first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.output(agent_id)
            if text in out:
                return out
            if self.record(agent_id)["state"] in ENDED:
                break
            time.sleep(0.05)
        raise AssertionError(f"agent {agent_id} never printed {text!r}: {self.output(agent_id)}")

    def run(self, source: str, timeout: float = 60.0, **kw) -> tuple[dict, str]:
        """Spawn an agent, wait for it to end; return its final record and its output."""
        rec = self.wait(self.spawn(source, **kw)["id"], timeout)
        return rec, self.output(rec["id"])

    def kill9(self) -> int:
        """SIGKILL the kernel (a crash: nothing is stopped in order) and wait for it; returns its status."""
        self._close_clients()
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)
        self._log.close()
        return self.popen.returncode

    def restarted(self) -> "KernelProc":
        """A new kernel on the same runtime dir, state dir and config, once this one has ended (stopped if it
        has not)."""
        if self.popen.poll() is None:
            self.stop()
        return KernelProc(self.tmp, self.config_text, self._preexec_fn, args=self._args, env=self._env)

    def _close_clients(self) -> None:
        for c in [*self._clients, *self._raws]:
            try:
                c.close()
            except Exception:
                pass
        self._clients.clear()
        self._raws.clear()

    def stop(self, timeout: float = 15.0, drain: bool = False) -> int:
        """SIGTERM the kernel -- twice, so that it does not drain, unless ``drain`` -- and wait; SIGKILL past
        ``timeout``.  Returns its exit status."""
        self._close_clients()
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

    def __enter__(self) -> "KernelProc":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --- syscall traces ------------------------------------------------------------------------------------

# Result fields that differ between two runs of the same agent; ``Trace.assert_matches`` ignores them.
VOLATILE = frozenset({"id", "pid", "uid", "gid", "started_at", "ended_at", "first_syscall_at", "created_at",
                      "updated_at", "at", "t", "ms", "usage", "uptime_s", "token", "scratch", "layers", "owner",
                      "max_frame", "seq", "chunks"})
# What a replay does not re-issue by default: the bootstrap's own report, valid once per agent.
NOT_REPLAYED = frozenset({"proc.ready"})


class Trace:
    """An agent's syscall trace: ``entries`` as ``proc.trace`` gives them (docs/abi.md, "Syscall traces").

    ``Trace.fetch(kernel, agent_id)`` reads one from a kernel (every page); ``save``/``load`` keep it as JSON;
    ``calls`` and ``errors`` are what tests usually assert on; ``replay(kernel)`` re-issues the calls and
    ``assert_matches(other)`` compares two runs."""

    def __init__(self, entries: list[dict], *, name: str = "", dropped: int = 0):
        self.entries, self.name, self.dropped = list(entries), name, dropped

    @classmethod
    def fetch(cls, kernel: "KernelProc", agent_id: int, *, discard: bool = False) -> "Trace":
        """The whole trace of agent ``agent_id`` (raises the SDK's ENOENT if it is not traced)."""
        entries, after = [], 0
        while True:
            page = kernel.client.call("proc.trace", {"id": agent_id, "after": after})
            entries += page["entries"]
            if not page["more"] or not page["entries"]:
                break
            after = page["entries"][-1]["seq"]
        if discard:
            kernel.client.call("proc.trace", {"id": agent_id, "after": after, "discard": True})
        return cls(entries, name=page["name"], dropped=page["dropped"])

    @property
    def calls(self) -> list[str]:
        """The syscalls made, in order."""
        return [e["call"] for e in self.entries]

    @property
    def errors(self) -> list[tuple[str, str]]:
        """(call, error code) of every call that failed, in order."""
        return [(e["call"], e["error"]) for e in self.entries if not e["ok"]]

    def save(self, path: str | os.PathLike) -> None:
        """Write it as JSON (``load`` reads it back)."""
        Path(path).write_text(json.dumps({"name": self.name, "dropped": self.dropped, "entries": self.entries},
                                         indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Trace":
        doc = json.loads(Path(path).read_text())
        return cls(doc["entries"], name=doc.get("name", ""), dropped=doc.get("dropped", 0))

    def replay(self, kernel: "KernelProc", *, skip=NOT_REPLAYED, compare: bool = True, results: bool = True,
               ignore=VOLATILE, timeout: float = 60.0) -> "Trace":
        """Re-issue the recorded calls, in order, through a raw operator connection to ``kernel``; return what
        it answered as a Trace.  With ``compare``, ``assert_matches`` that against this one.

        Not re-issued: calls in ``skip``, and entries whose arguments were cut (``truncated`` names ``args``: the
        kernel kept only part of them) -- they are left out of both sides of the comparison.  The replay speaks as an
        operator, not as the agent: calls whose answer depends on who asks (``proc.self``, storage
        namespaces) answer differently -- skip them or compare without ``results``."""
        raw = kernel.raw_client()
        kept, answered = [], []
        try:
            for entry in self.entries:
                if entry["call"] in skip or "args" in entry.get("truncated", ()):
                    continue
                t = time.perf_counter()
                reply = raw.request(entry["call"], entry["args"] or None, timeout=timeout)
                got = {"seq": entry["seq"], "call": entry["call"], "args": entry["args"], "ok": reply["ok"],
                       "ms": round((time.perf_counter() - t) * 1000, 3)}
                if reply["ok"]:
                    got["result"] = _bounded(reply["result"])
                else:
                    got["error"] = reply["error"]["code"]
                kept.append(entry)
                answered.append(got)
        finally:
            raw.close()
        replayed = Trace(answered, name=self.name)
        if compare:
            Trace(kept, name=self.name).assert_matches(replayed, results=results, ignore=ignore, skip=())
        return replayed

    def assert_matches(self, other: "Trace", *, results: bool = True, ignore=VOLATILE, skip=NOT_REPLAYED) -> None:
        """AssertionError naming the first difference unless ``other`` made the same calls with the same
        arguments and outcomes (error codes; and results, but for the keys in ``ignore``, with ``results``).
        Calls in ``skip`` (the bootstrap's report of its sandbox) are left out of both."""
        mine = [e for e in self.entries if e["call"] not in skip]
        theirs = [e for e in other.entries if e["call"] not in skip]
        for i, (a, b) in enumerate(zip(mine, theirs)):
            where = f"call {i + 1} ({a['call']}, seq {a.get('seq')} / {b.get('seq')})"
            assert a["call"] == b["call"], f"{where}: {a['call']} here, {b['call']} there"
            assert a["args"] == b["args"], f"{where}: arguments differ: {a['args']!r} / {b['args']!r}"
            assert a["ok"] == b["ok"] and a.get("error") == b.get("error"), \
                f"{where}: {a.get('error', 'ok')} here, {b.get('error', 'ok')} there"
            if results and a["ok"]:
                ra, rb = _without(a.get("result"), ignore), _without(b.get("result"), ignore)
                assert ra == rb, f"{where}: results differ: {ra!r} / {rb!r}"
        assert len(mine) == len(theirs), (f"{len(mine)} calls here, {len(theirs)} there; the first unmatched: "
                                          f"{(mine[len(theirs):] or theirs[len(mine):])[0]['call']}")


def _bounded(value):
    from kernel.trace import bounded

    return bounded(value)[0]


def _without(value, ignore):
    if isinstance(value, dict):
        return {k: _without(v, ignore) for k, v in value.items() if k not in ignore}
    if isinstance(value, list):
        return [_without(v, ignore) for v in value]
    return value


# --- an OpenAI-compatible server, and faults in front of it (remote cores: docs/remote.md) -------------

def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """llama-cpp-python's OpenAI-compatible server (``python -m llama_cpp.server``, its ``[server]`` extra in the
    test extra) on ``model_path``, e.g. ``model_path()``, on loopback: ``.base_url`` ends in ``/v1``; ``.stop()`` it (it is also
    killed if the test process dies first: it runs in its own session, bounded by the caller's ``stop``)."""

    def __init__(self, model_path: str, *, threads: int = 2, n_ctx: int = 2048, pythonpath: str | None = None,
                 timeout: float = 120.0):
        import os
        import subprocess
        import sys
        import time
        import urllib.request

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        env = dict(os.environ, PYTHONPATH=pythonpath) if pythonpath else None
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", model_path, "--n_ctx", str(n_ctx),
             "--n_threads", str(threads), "--n_threads_batch", str(threads), "--port", str(self.port),
             "--host", "127.0.0.1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None:
                raise RuntimeError("llama_cpp.server exited at start: is its [server] extra installed "
                                   "(pip install '.[test]')?")
            try:
                urllib.request.urlopen(f"{self.base_url}/models", timeout=2).read()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"llama_cpp.server did not answer within {timeout} s")
                time.sleep(0.3)

    def stop(self) -> None:
        import subprocess

        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


class FaultProxy:
    """A TCP relay on loopback in front of an HTTP server, whose faults a test switches by setting ``mode``:

    - ``"pass"``: relay (each request on a connection of its own: ``Connection: close`` is added);
    - ``"delay"``: hold each request ``delay_s`` seconds before relaying it (a slow server);
    - ``"500"``: answer ``HTTP 500`` without asking the server;
    - ``"refuse"``: close each connection at once (a server that is gone);
    - ``"cut"``: relay the first ``cut_after`` bytes of the answer, then close (a server killed mid-stream).

    ``heads`` keeps every request head received (to check what the kernel sent); ``aborted`` counts answers
    whose client hung up before the server had finished (a cancelled stream)."""

    def __init__(self, upstream_port: int):
        import socket
        import threading

        self.upstream_port = upstream_port
        self.mode, self.delay_s, self.cut_after = "pass", 0.0, 1500
        self.heads: list[bytes] = []
        self.aborted = 0
        self.requests = 0
        self._stop = threading.Event()
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(64)
        self._srv.settimeout(0.2)
        self.port = self._srv.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._srv.close()

    def _accept(self) -> None:
        import socket
        import threading

        while not self._stop.is_set():
            try:
                conn, _ = self._srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        import socket

        mode = self.mode
        up = None
        try:
            conn.settimeout(30)
            data = b""
            while b"\r\n\r\n" not in data:
                piece = conn.recv(65536)
                if not piece:
                    return
                data += piece
            head, body = data.split(b"\r\n\r\n", 1)
            length = 0
            lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
            for line in lines:
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            while len(body) < length:
                piece = conn.recv(65536)
                if not piece:
                    return
                body += piece
            self.heads.append(head)
            self.requests += 1
            if mode == "refuse":
                return
            if mode == "500":
                msg = b'{"error": {"message": "injected failure"}}'
                conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(msg), msg))
                return
            if mode == "delay" and self._stop.wait(self.delay_s):
                return
            up = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=120)
            up.sendall(b"\r\n".join(lines + [b"Connection: close"]) + b"\r\n\r\n" + body)
            sent = 0
            while True:
                piece = up.recv(65536)
                if not piece:
                    return
                if mode == "cut" and sent + len(piece) > self.cut_after:
                    conn.sendall(piece[: max(0, self.cut_after - sent)])
                    return
                try:
                    conn.sendall(piece)
                except OSError:
                    self.aborted += 1
                    return
                sent += len(piece)
        except OSError:
            return
        finally:
            for s in (conn, up):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass
