"""Remote LLM cores: an OpenAI-compatible server (vLLM, llama-server, llama-cpp-python's server, a hosted API)
served to agents exactly like a model the kernel loads itself (docs/remote.md).

``RemoteCore`` offers the kernel what ``kernel.llm.engine.Engine`` offers: ``prepare`` (on the preparer's worker:
check the arguments, build the HTTP body), ``enqueue`` (queue it with its owner, priority and key),
``cancel``/``cancel_key``/``cancel_owner``, ``stats``, ``start``/``close``, and the same sink events
(``chunk``, then exactly one ``done`` or ``error`` carrying ``usage``).  So every request for it passes the
same syscall handlers, privilege checks, quotas and accounting.

Scheduling.  Instead of batch slots a remote core has a concurrency budget: at most ``concurrency`` requests in
flight to the server, at most ``agent_concurrency`` of them one agent's.  Whenever a request ends, the kernel's
``[llm] scheduler`` policy (kernel/llm/scheduler.py) picks who gets the freed place among the waiting requests --
with ``fair``, the agent that has been served least -- so one agent's burst cannot take the server from the
others.  The policy is charged the prompt tokens at admission and each completion token as it arrives.
``tokens_per_s`` is a token bucket in front of admission (a provider's rate limit): a request reserves its
prompt estimate plus ``max_tokens`` and gets back what it did not use.

I/O.  Each core runs its own asyncio event loop with one ``httpx.AsyncClient`` in a thread of its own: never
the kernel's event loop thread, never a local engine's thread, so a dead or slow server stalls only the
requests sent to it.  An asyncio loop rather than a pool of blocking threads because cancelling a task closes
its HTTP stream at once, even while it waits for the server's next byte, and hundreds of requests in flight
cost no thread each.

Failures.  Connection errors, 429 and 5xx answers are retried (``retries`` times, with backoff) while the agent
has been sent nothing; then the request gets ``EIO``.  A server that sends nothing for ``timeout_s`` gives
``ETIMEDOUT``.  ``breaker_failures`` failed attempts in a row open the circuit breaker: for ``breaker_s``
requests fail at once with ``EIO`` instead of piling up on a dead server; then one request is let through as a
probe, and its success closes the breaker.  What the server's API cannot express is ``ENOTSUP`` before anything
is sent.  The key (``api_key_file`` or ``api_key_env``) is read once at start, lives in this object only and is
sent only to ``base_url``; agents never see it, the address, or the network.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import random
import threading
import time
from urllib.parse import urlsplit

import httpx

from kernel.llm.grammar import SchemaError, check_schema
from kernel.llm.model import CHAT_ROLES
from kernel.llm.request import Cancellable, EngineError, SamplingParams, check_params
from kernel.llm.scheduler import Scheduler, make_scheduler

log = logging.getLogger(__name__)

KIND = "openai"
BYTES_PER_TOKEN = 4  # a prompt's token estimate until the server reports its count (its tokenizer is not ours)
MAX_ERROR_TEXT = 300  # characters of a server's error message passed on to the agent
WAITING, RUNNING, DONE = "waiting", "running", "done"
CANCELLED = EngineError("ECANCELED", "the request was cancelled")  # copied by _finish, never sent as is
SERVER_FAULTS = ("EIO", "ETIMEDOUT")  # errors that count against the server (its circuit breaker)
_IDS = itertools.count(1)


class RemoteRequest:
    """One request for a remote core; the caller treats it as an opaque handle (as ``kernel.llm.request.Request``:
    ``owner``, ``tag``, ``key``, ``priority`` are what the caller passed, ``model`` names the core)."""

    __slots__ = ("id", "owner", "tag", "key", "stream", "priority", "model", "path", "body", "estimate",
                 "max_tokens", "state", "cancelled", "task", "sent", "n_chunks", "reserved")

    def __init__(self, prep: "RemotePrepared", owner, tag, key, stream: bool, priority: int, model: str):
        self.id = next(_IDS)
        self.owner, self.tag, self.key, self.stream, self.priority, self.model = owner, tag, key, stream, priority, model
        self.path, self.body, self.estimate = prep.path, prep.body, len(prep.tokens)
        self.max_tokens = prep.params.max_tokens
        self.state = WAITING  # guarded by RemoteCore._lock
        self.cancelled = False  # guarded by RemoteCore._lock
        self.task: asyncio.Task | None = None  # the loop thread's
        self.sent = False  # the body reached the server at least once (it computed something)
        self.n_chunks = 0  # text pieces streamed to the agent (a retry after one would repeat them)
        self.reserved = 0  # tokens taken from the rate bucket at admission

    def __repr__(self) -> str:
        return f"<RemoteRequest {self.id} owner={self.owner!r} {self.state}>"


class RemotePrepared:
    """A request ``RemoteCore.prepare`` made ready: the endpoint and JSON body, a private copy of its params,
    and ``tokens``, a ``range`` as long as the estimated prompt (the kernel sizes quotas by ``len``; the
    server's own count replaces it in ``usage``)."""

    __slots__ = ("engine", "path", "body", "params", "tokens", "cost_s")

    def __init__(self, engine, path: str, body: dict, params: SamplingParams, estimate: int):
        self.engine, self.path, self.body, self.params = engine, path, body, params
        self.tokens, self.cost_s = range(estimate), 0.0

    def free(self) -> None:
        """Nothing to free (no C state); here for the kernel's symmetry with local engines."""


class RemoteCore(Cancellable):
    """An OpenAI-compatible server as an LLM core (see the module docstring).  Thread-safe public methods;
    ``sink([(request, kind, payload)])`` is called from the core's own thread, one event a call."""

    kind = KIND
    kv_size = 0  # no KV cells of the kernel's

    def __init__(self, name: str, sink, *, base_url: str, model: str = "", api_key_file: str = "",
                 api_key_env: str = "", n_ctx_seq: int = 2048, concurrency: int = 4, agent_concurrency: int = 0,
                 tokens_per_s: int = 0, timeout_s: float = 120.0, connect_timeout_s: float = 5.0,
                 retries: int = 2, breaker_failures: int = 5, breaker_s: float = 30.0,
                 response_format: str = "json_schema", completions: bool = True, send_top_k: bool = True,
                 policy: Scheduler | str | None = "fair", rr_slice: int = 32, clock=time.monotonic,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.name = name
        self.base_url = base_url.rstrip("/") + "/"
        self.model = model or name
        self.n_ctx_seq = n_ctx_seq
        self.concurrency = concurrency
        self.agent_concurrency = agent_concurrency or max(1, (concurrency + 1) // 2)
        self.tokens_per_s = tokens_per_s
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self.retries, self.breaker_failures, self.breaker_s = retries, breaker_failures, breaker_s
        self.response_format, self.completions, self.send_top_k = response_format, completions, send_top_k
        self._key_file, self._key_env = api_key_file, api_key_env
        self._headers: dict[str, str] = {}
        self._sink = sink
        self._clock = clock
        self._transport = transport  # tests: an httpx transport instead of the network
        if isinstance(policy, str) or policy is None:
            policy = make_scheduler(policy or "fair", rr_slice=rr_slice)
        self._policy = policy
        self._lock = threading.Lock()
        self._pending: dict[int, RemoteRequest] = {}  # waiting + running, by id
        self._by_key: dict = {}
        self._running: set[RemoteRequest] = set()
        self._per_owner: dict = {}  # owner -> requests of it running
        self._bucket = float(tokens_per_s)  # tokens available now (may go negative: a debt)
        self._bucket_t = clock()
        self._failures = 0  # failed attempts in a row
        self._open_until = 0.0  # the breaker is open until then
        self._probing = False  # half-open: one request is testing the server
        self._closed = False
        self._stats = {"requests": 0, "failures": 0, "retries": 0, "tokens_generated": 0, "prompt_tokens": 0,
                       "breaker_opened": 0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None
        self._thread: threading.Thread | None = None
        self._admit_timer = None  # the loop's pending call_later of _admit (rate limit), if any

    @classmethod
    def from_config(cls, name: str, section, llm, sink) -> "RemoteCore":
        """The core of a ``[models.NAME] kind = "openai"`` section (kernel/config.py ``ModelSection``), with the
        ``[llm]`` section's scheduler and its ``n_ctx_seq`` unless the section sets its own."""
        keys = ("base_url", "model", "api_key_file", "api_key_env", "concurrency", "agent_concurrency",
                "tokens_per_s", "timeout_s", "connect_timeout_s", "retries", "breaker_failures", "breaker_s",
                "response_format", "completions", "send_top_k")
        return cls(name, sink, n_ctx_seq=section.n_ctx_seq or llm.n_ctx_seq, policy=llm.scheduler,
                   rr_slice=llm.rr_slice, **{k: getattr(section, k) for k in keys})

    @property
    def model_name(self) -> str:
        """For logs: the server's model name and host (never a key, never credentials in the URL)."""
        return f"{self.model} at {urlsplit(self.base_url).hostname} (remote)"

    # ---- public API (any thread) -------------------------------------------------------------------------

    def start(self) -> None:
        """Read the key and start the core's thread and event loop.  Does not contact the server (a dead
        server must not keep the kernel from starting).  Raises ``EngineError("EIO")`` naming the missing key."""
        self._headers = {"Authorization": f"Bearer {self._read_key()}"} if self._key_file or self._key_env else {}
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            self._client = httpx.AsyncClient(
                base_url=self.base_url, headers=self._headers, follow_redirects=False, trust_env=False,
                transport=self._transport,
                timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
                limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency))
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._client.aclose())
                loop.close()

        with self._lock:
            if self._closed:
                raise EngineError("EINVAL", "the remote core is closed; create a new one")
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=run, name=f"llm-remote-{self.name}", daemon=True)
        self._thread.start()
        ready.wait()
        log.info("remote core %s: %s, %d requests in flight at most (%d per agent), %s scheduler", self.name,
                 self.model_name, self.concurrency, self.agent_concurrency, self._policy.name)

    def prepare(self, prompt: str | list[int] | None, params: SamplingParams, *,
                messages: list[dict] | None = None) -> RemotePrepared:
        """Check ``params`` and the request against what the server's API can express and build its body.
        Raises ``EngineError``: ``EINVAL`` (bad params, messages or json_schema), ``ENOTSUP`` (token ids,
        json_schema without ``response_format``, ``llm.generate`` without ``/v1/completions``)."""
        check_params(params)
        params = SamplingParams(params.max_tokens, float(params.temperature), params.top_k, float(params.top_p),
                                params.seed, list(params.stop), params.json_schema)  # a private copy
        body: dict = {"model": self.model, "max_tokens": params.max_tokens, "temperature": params.temperature,
                      "top_p": params.top_p}
        if self.send_top_k and params.top_k > 0:
            body["top_k"] = params.top_k
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.json_schema is not None:
            try:
                check_schema(params.json_schema)
            except SchemaError as exc:
                raise EngineError("EINVAL", str(exc)) from None
        if messages is not None:
            size = 0
            for i, m in enumerate(messages):
                role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
                if role not in CHAT_ROLES:
                    raise EngineError("EINVAL", f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}")
                if not isinstance(content, str) or "\x00" in content:
                    raise EngineError("EINVAL", f"messages[{i}].content must be a string without NUL characters")
                size += len(content.encode("utf-8", errors="replace")) + 8
            if not messages:
                raise EngineError("EINVAL", "messages must be a non-empty list of {role, content} maps")
            body["messages"] = [{"role": m["role"], "content": m["content"]} for m in messages]
            if params.json_schema is not None:
                body["response_format"] = self._response_format(params.json_schema)
            path = "chat/completions"
        else:
            if not isinstance(prompt, str):
                raise EngineError("ENOTSUP", f"model {self.name!r} is a remote core: it takes a text prompt, not "
                                  "token ids (their vocabulary is the server's)")
            if not self.completions:
                raise EngineError("ENOTSUP", f"model {self.name!r} is served by a server without /v1/completions: "
                                  "use llm.chat with it")
            if params.json_schema is not None:
                raise EngineError("ENOTSUP", f"model {self.name!r} is a remote core, and the completions API has "
                                  "no response_format: use llm.chat for json_schema")
            if "\x00" in prompt:
                raise EngineError("EINVAL", "prompt must not contain NUL characters")
            body["prompt"] = prompt
            size = len(prompt.encode("utf-8", errors="replace"))
            path = "completions"
        return RemotePrepared(self, path, body, params, max(1, size // BYTES_PER_TOKEN))

    def enqueue(self, prep: RemotePrepared, *, max_tokens: int | None = None, owner=None, tag=None,
                stream: bool = False, priority: int = 0, key=None, scope=None) -> RemoteRequest:
        """Queue a request ``prepare`` made (by this core), with at most ``max_tokens``; arguments as
        ``Engine.enqueue`` (``scope`` is ignored: nothing is cached here).  Raises ``ECANCELED`` when closed."""
        if prep.engine is not self:
            raise ValueError("enqueue takes a RemotePrepared of this core")
        if max_tokens is not None:
            prep.params.max_tokens = max(1, min(prep.params.max_tokens, max_tokens))
        body = dict(prep.body, max_tokens=prep.params.max_tokens)
        prep.body = body
        req = RemoteRequest(prep, owner, tag, key, bool(stream), int(priority), self.name)
        with self._lock:
            if self._closed or self._loop is None:
                raise EngineError("ECANCELED", "the remote core is shutting down")
            self._pending[req.id] = req
            if key is not None:
                self._by_key[key] = req
            self._policy.add(req)
            self._stats["requests"] += 1
        self._loop.call_soon_threadsafe(self._admit)
        return req

    def cancel_owner(self, owner) -> int:
        with self._lock:
            return sum(self._cancel_locked(r) for r in list(self._pending.values()) if r.owner == owner)

    def stats(self) -> dict:
        """Counters: ``active`` (requests in flight to the server), ``waiting``, ``requests``, ``failures``
        (failed attempts), ``retries``, ``tokens_generated``, ``prompt_tokens``, ``breaker_opened`` (times),
        ``breaker`` (``closed``, ``open``, ``half-open``), ``kind`` and ``scheduler``."""
        with self._lock:
            out = dict(self._stats, active=len(self._running), waiting=len(self._pending) - len(self._running))
            out["breaker"] = ("open" if self._clock() < self._open_until else
                              "half-open" if self._failures >= self.breaker_failures else "closed")
        out["kind"], out["scheduler"] = KIND, self._policy.name
        return out

    def close(self) -> None:
        """Cancel everything pending (``ECANCELED``), close the connections, stop the thread.  Idempotent."""
        with self._lock:
            self._closed = True
            for req in list(self._pending.values()):
                self._cancel_locked(req)
            thread, loop = self._thread, self._loop
        if loop is None or thread is None:
            return
        if thread is threading.current_thread():
            return

        async def drain() -> None:
            tasks = [r.task for r in list(self._pending.values()) if r.task is not None]
            if tasks:
                await asyncio.wait(tasks, timeout=5)
            loop.stop()

        try:
            asyncio.run_coroutine_threadsafe(drain(), loop)
        except RuntimeError:  # the loop is already closed
            pass
        thread.join(10)

    # ---- helpers --------------------------------------------------------------------------------------------

    def _read_key(self) -> str:
        """The API key from ``api_key_file`` or the kernel's ``api_key_env``; ``EngineError("EIO")`` otherwise."""
        if self._key_file:
            try:
                with open(self._key_file, encoding="utf-8") as f:
                    key = f.read().strip()
            except OSError as exc:
                raise EngineError("EIO", f"[models.{self.name}] api_key_file {self._key_file}: cannot read it "
                                  f"({exc.strerror})") from None
            if os.stat(self._key_file).st_mode & 0o004:
                log.warning("remote core %s: %s is readable by every user; chmod 600 it", self.name, self._key_file)
            where = f"api_key_file {self._key_file}"
        else:
            key = os.environ.get(self._key_env, "").strip()
            where = f"the kernel's environment variable {self._key_env}"
        if not key or "\n" in key:
            raise EngineError("EIO", f"[models.{self.name}]: {where} holds no key (one line expected)")
        return key

    def _response_format(self, schema: dict) -> dict:
        if self.response_format == "json_schema":  # OpenAI's structured outputs (vLLM, llama-server too)
            return {"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": True}}
        if self.response_format == "json_object":  # llama-cpp-python's server, llama-server
            return {"type": "json_object", "schema": schema}
        raise EngineError("ENOTSUP", f"model {self.name!r} is served by a server without response_format "
                          "([models] response_format = \"none\"): json_schema and tool calls need a local model or "
                          "a server that constrains its output")

    def _cancel_locked(self, req: RemoteRequest) -> bool:
        if req.state == DONE or req.cancelled:
            return False
        req.cancelled = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._cancel_on_loop, req)
            except RuntimeError:  # the loop stopped meanwhile: nothing will run it
                pass
        return True

    # ---- the core's thread ----------------------------------------------------------------------------------

    def _cancel_on_loop(self, req: RemoteRequest) -> None:
        if req.task is not None:
            req.task.cancel()  # closes its HTTP stream; the task reports ECANCELED
        elif req.state == WAITING:
            self._finish(req, "error", CANCELLED)

    def _refill(self, now: float) -> None:
        if self.tokens_per_s:
            self._bucket = min(float(self.tokens_per_s), self._bucket + (now - self._bucket_t) * self.tokens_per_s)
        self._bucket_t = now

    def _admit(self) -> None:
        """Hand the free places of the concurrency budget to waiting requests, in the policy's order, within each
        agent's share and the token rate; fail them at once while the circuit breaker is open."""
        now = self._clock()
        failed, started = [], []
        with self._lock:
            waiting = [r for r in self._policy.pick(len(self._policy), set()) if r.state == WAITING
                       and not r.cancelled]
            if now < self._open_until:
                failed = waiting
            else:
                self._refill(now)
                half_open = self._failures >= self.breaker_failures
                room = (1 if not self._probing else 0) if half_open else self.concurrency - len(self._running)
                for req in waiting:
                    if room <= 0 or (self.tokens_per_s and self._bucket < 0):
                        break
                    if self._per_owner.get(req.owner, 0) >= self.agent_concurrency:
                        continue
                    req.state = RUNNING
                    self._running.add(req)
                    self._per_owner[req.owner] = self._per_owner.get(req.owner, 0) + 1
                    req.reserved = req.estimate + req.max_tokens
                    self._bucket -= req.reserved if self.tokens_per_s else 0
                    self._policy.charge(req, req.estimate)
                    self._probing = self._probing or half_open
                    room -= 1
                    started.append(req)
                if self.tokens_per_s and self._bucket < 0 and len(waiting) > len(started) and self._admit_timer is None:
                    self._admit_timer = self._loop.call_later(-self._bucket / self.tokens_per_s, self._admit_later)
        for req in failed:
            self._finish(req, "error", EngineError("EIO", self._breaker_message(now)))
        for req in started:
            req.task = self._loop.create_task(self._serve(req))
            # a task cancelled before its first step never runs its body: report it here (_finish is once only)
            req.task.add_done_callback(lambda _, r=req: self._finish(r, "error", CANCELLED))

    def _admit_later(self) -> None:
        self._admit_timer = None
        self._admit()

    def _breaker_message(self, now: float) -> str:
        return (f"model {self.name!r}: its server failed {self.breaker_failures} times in a row; requests fail at "
                f"once for another {max(0.0, self._open_until - now):.0f} s (circuit breaker), then one is tried")

    async def _serve(self, req: RemoteRequest) -> None:
        """Run one request to its end: attempts with retries, then exactly one done/error event."""
        text: list[str] = []
        try:
            attempt = 0
            while True:
                retry_after = None
                try:
                    result = await self._attempt(req, text)
                    break
                except _Retryable as exc:
                    error, retry, retry_after = exc.error, True, exc.retry_after
                except EngineError as exc:
                    if exc.code not in SERVER_FAULTS:
                        raise
                    error, retry = exc, False
                self._attempt_failed()
                if not retry or req.n_chunks or attempt >= self.retries or self._clock() < self._open_until:
                    raise error
                attempt += 1
                with self._lock:
                    self._stats["retries"] += 1
                delay = retry_after if retry_after is not None else 0.25 * 2 ** attempt
                await asyncio.sleep(min(10.0, delay) * random.uniform(0.8, 1.2))
            self._attempt_succeeded()
            self._finish(req, "done", result)
        except asyncio.CancelledError:
            self._finish(req, "error", CANCELLED, text)
        except EngineError as exc:
            self._finish(req, "error", exc, text)
        except Exception as exc:  # a bug of ours: that request only
            log.exception("remote core %s: request %d failed", self.name, req.id)
            self._finish(req, "error", EngineError("EIO", f"the kernel's remote client failed ({type(exc).__name__})"),
                         text)

    async def _attempt(self, req: RemoteRequest, text: list[str]) -> dict:
        """One HTTP exchange; the done payload.  Raises ``_Retryable`` (wrapping the error the request gets if
        it is not retried) or ``EngineError``."""
        chat = req.path == "chat/completions"
        try:
            if not req.stream:
                req.sent = True
                resp = await self._client.post(req.path, json=req.body)
                if resp.status_code != 200:
                    raise self._http_error(resp.status_code, resp.text, resp.headers)
                answer = resp.json()
                choice = (answer.get("choices") or [{}])[0]
                piece = (choice.get("message") or {}).get("content") if chat else choice.get("text")
                text[:] = [piece or ""]
                return self._done(req, text, choice.get("finish_reason"), answer.get("usage"))
            body = dict(req.body, stream=True, stream_options={"include_usage": True})
            req.sent = True
            async with self._client.stream("POST", req.path, json=body) as resp:
                if resp.status_code != 200:
                    raise self._http_error(resp.status_code, (await resp.aread()).decode(errors="replace"),
                                           resp.headers)
                finish, usage = None, None
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if event.get("error"):
                        raise EngineError("EIO", f"model {self.name!r}: the server failed mid-answer: "
                                          f"{str(event['error'])[:MAX_ERROR_TEXT]}")
                    usage = event.get("usage") or usage
                    for choice in event.get("choices") or ():
                        piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                        if piece:
                            text.append(piece)
                            req.n_chunks += 1
                            self._chunk(req, piece)
                        finish = choice.get("finish_reason") or finish
                if finish is None:
                    raise EngineError("EIO", f"model {self.name!r}: the server ended the answer without finishing it")
                return self._done(req, text, finish, usage)
        except httpx.ReadTimeout:
            raise EngineError("ETIMEDOUT", f"model {self.name!r}: the server sent nothing for {self.timeout_s:g} s "
                              "([models] timeout_s)") from None
        except (httpx.TransportError, httpx.DecodingError) as exc:
            error = EngineError("EIO", f"model {self.name!r}: the server could not be reached or dropped the "
                                f"connection ({type(exc).__name__})")
            raise _Retryable(error) from None
        except ValueError:  # JSON that does not parse
            raise EngineError("EIO", f"model {self.name!r}: the server's answer is not OpenAI's JSON") from None

    def _http_error(self, status: int, text: str, headers) -> Exception:
        """The error of a non-200 answer: ``_Retryable`` for 429 and 5xx, else the request's ``EngineError``."""
        try:
            detail = json.loads(text)
            detail = detail.get("error", detail) if isinstance(detail, dict) else detail
            detail = detail.get("message", detail) if isinstance(detail, dict) else detail
        except ValueError:
            detail = text
        detail = str(detail)[:MAX_ERROR_TEXT]
        where = f"model {self.name!r}: the server answered HTTP {status}: {detail}"
        if status == 429 or status >= 500:
            retry_after = headers.get("retry-after")
            try:
                retry_after = float(retry_after) if retry_after is not None else None
            except ValueError:
                retry_after = None
            return _Retryable(EngineError("EIO", where), retry_after)
        if status in (401, 403):
            return EngineError("EIO", f"model {self.name!r}: the server refused the kernel's credentials (HTTP "
                               f"{status}); an operator must check [models.{self.name}] api_key_file / api_key_env")
        if status == 404:
            return EngineError("ENOTSUP", f"{where} (the server lacks this endpoint or model)")
        if status in (400, 413, 422) and "context" in detail.lower():
            return EngineError("E2BIG", where)
        return EngineError("EINVAL", where)

    def _done(self, req: RemoteRequest, text: list[str], finish, usage) -> dict:
        usage = usage if isinstance(usage, dict) else {}
        completion = usage.get("completion_tokens")
        prompt = usage.get("prompt_tokens")
        usage = {"prompt_tokens": prompt if isinstance(prompt, int) else req.estimate,
                 "completion_tokens": completion if isinstance(completion, int) else req.n_chunks,
                 "cached_tokens": 0}
        return {"text": "".join(text), "finish_reason": "length" if finish == "length" else "stop", "usage": usage}

    def _attempt_failed(self) -> None:
        with self._lock:
            self._stats["failures"] += 1
            self._failures += 1
            self._probing = False
            if self._failures >= self.breaker_failures:
                self._open_until = self._clock() + self.breaker_s
                self._stats["breaker_opened"] += 1
                log.warning("remote core %s: %d failures in a row; failing requests at once for %g s",
                            self.name, self._failures, self.breaker_s)

    def _attempt_succeeded(self) -> None:
        with self._lock:
            if self._failures >= self.breaker_failures:
                log.info("remote core %s: the server answers again", self.name)
            self._failures, self._probing = 0, False

    def _chunk(self, req: RemoteRequest, piece: str) -> None:
        with self._lock:
            if req.cancelled:
                return
            self._policy.charge(req, 1)
        self._emit(req, "chunk", {"text": piece})

    def _finish(self, req: RemoteRequest, kind: str, payload, text: list[str] | None = None) -> None:
        """Send a request's last event, once; free its place and let the next one in.  A cancelled request
        always reports ECANCELED.  An error carries what the server computed: its prompt if it was sent, and
        the pieces streamed."""
        with self._lock:
            if req.state == DONE:
                return
            running = req.state == RUNNING
            req.state = DONE
            del self._pending[req.id]
            if req.key is not None and self._by_key.get(req.key) is req:
                del self._by_key[req.key]
            if running:
                self._running.discard(req)
                self._per_owner[req.owner] -= 1
                if not self._per_owner[req.owner]:
                    del self._per_owner[req.owner]
            if req.cancelled:
                kind, payload = "error", CANCELLED
            if kind == "error":
                payload = EngineError(payload.code, payload.message)
                payload.usage = {"prompt_tokens": req.estimate if req.sent else 0, "completion_tokens": req.n_chunks,
                                 "cached_tokens": 0}
            usage = payload["usage"] if kind == "done" else payload.usage
            if kind == "done":
                self._policy.charge(req, usage["completion_tokens"] - req.n_chunks)
            self._policy.remove(req)
            if self.tokens_per_s:
                self._refill(self._clock())
                self._bucket += req.reserved - usage["prompt_tokens"] - usage["completion_tokens"]
            self._stats["tokens_generated"] += usage["completion_tokens"]
            self._stats["prompt_tokens"] += usage["prompt_tokens"]
        self._emit(req, kind, payload)
        if running and self._loop is not None and not self._closed:
            self._admit()

    def _emit(self, req: RemoteRequest, kind: str, payload) -> None:
        try:
            self._sink([(req, kind, payload)])
        except Exception:  # the sink is the caller's; its failure must not stop the core
            log.exception("remote core sink failed on %s event of request %d", kind, req.id)


class _Retryable(Exception):
    """An attempt failed in a way worth trying again (unreachable, dropped, 429, 5xx); ``error`` is what the
    request gets if it is not."""

    def __init__(self, error: EngineError, retry_after: float | None = None):
        super().__init__(error.message)
        self.error, self.retry_after = error, retry_after
