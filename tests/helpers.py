"""Helpers shared by the tests (as Trio's ``tutil``): what several test files need, in one place."""
from __future__ import annotations

import json


def agent_result(output: str) -> dict:
    """The JSON an agent printed on its last ``RESULT {...}`` line (the test fails, showing the output, if
    there is none)."""
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, output
    return json.loads(lines[-1][len("RESULT "):])


def config_error(tmp_path, text: str, words: str):
    """Load ``text`` as a config file under ``tmp_path``: it must be refused with a ConfigError matching
    ``words`` (a regular expression), which is returned; its message names the file."""
    import pytest

    from kernel.config import ConfigError, load

    path = tmp_path / "aiosd.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=words) as err:
        load(path)
    assert str(path) in str(err.value)
    return err.value


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """llama-cpp-python's OpenAI-compatible server (``python -m llama_cpp.server``, its ``[server]`` extra in the
    test extra) on ``model_path``, on loopback: ``.base_url`` ends in ``/v1``; ``.stop()`` it (it is also
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
