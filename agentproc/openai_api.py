"""The OpenAI HTTP API, answered inside the agent's own process over its syscall connection (docs/sdk.md).

Agents written for the official ``openai`` package run unmodified::

    from openai import OpenAI
    print(OpenAI().chat.completions.create(model="gpt-4o-mini", messages=[...]).choices[0].message.content)

How, with no change to the agent's code and no TCP socket: the bootstrap calls ``openai_hook.install()`` before
the agent runs, which sets ``OPENAI_BASE_URL`` to ``http://aiosd.invalid/v1`` and ``OPENAI_API_KEY`` to a placeholder (the
kernel knows the agent by its connection, never by a key), and adds an import hook: when the program first
imports ``httpx`` or ``httpx2`` (the HTTP libraries openai is built on), every client they make mounts a
``Transport`` for that host.  The transport turns each request into syscalls on the agent's connection
(``llm.chat``, ``llm.generate``, ``llm.models``, ``llm.cancel``) and the answers into OpenAI's JSON and
server-sent events.  Agents that never import those libraries pay nothing but the hook.  ``.invalid`` is a
name that never resolves: a client that somehow bypassed the transport would fail, not reach a network.

Mapping (docs/sdk.md has the table): ``messages`` (system, developer, user, assistant with ``tool_calls``, tool
results as user turns), ``max_tokens``/``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``,
``stop``, ``stream`` (with ``stream_options.include_usage``), ``tools``/``tool_choice`` (the kernel's
constrained tool calls), ``response_format`` (``json_schema``, ``json_object``), ``n`` = 1.  A model name the
kernel does not serve (agents written for hosted models name theirs) is answered by the kernel's default model
and the response's ``model`` says which.  ABI errors become the statuses openai maps to its exceptions: EINVAL
400 ``BadRequestError`` (also E2BIG and ENOTSUP), EPERM 403, ENOENT 404, EAGAIN 429 (retried), EDQUOT 429 not retried, ETIMEDOUT 504,
ECANCELED 503 not retried, others 500.
"""
from __future__ import annotations

import json
import time
from typing import Any

from agentproc import client as _client
from syscalls.errors import SyscallError

from agentproc.openai_hook import HOST

# ABI error code -> (HTTP status, OpenAI error type, whether a client may retry)
STATUS = {
    "EINVAL": (400, "invalid_request_error", False), "EBADMSG": (400, "invalid_request_error", False),
    "E2BIG": (400, "invalid_request_error", False), "EPROTO": (400, "invalid_request_error", False),
    "ENOTSUP": (400, "invalid_request_error", False),
    "EPERM": (403, "permission_error", False), "EACCES": (403, "permission_error", False),
    "ENOENT": (404, "not_found_error", False), "ENOSYS": (404, "not_found_error", False),
    "EAGAIN": (429, "rate_limit_error", True), "EDQUOT": (429, "insufficient_quota", False),
    "ETIMEDOUT": (504, "timeout", True), "ECANCELED": (503, "cancelled", False),
}


class APIError(Exception):
    """A request this module refuses before any syscall (HTTP 400/404), with OpenAI's error shape."""

    def __init__(self, status: int, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


# --- installing it (agentproc/openai_hook.py calls this when the program imports an HTTP library) ------------
def patch(httpx) -> None:
    """Make every ``Client``/``AsyncClient`` of the HTTP library ``httpx`` send ``HOST``'s requests to the
    kernel: a mount for that host, ahead of whatever the caller mounts or passes as ``transport``."""
    if getattr(httpx, "_aiosd_patched", False):
        return
    pattern = f"all://{HOST}"

    def wrap(cls, make):
        init = cls.__init__

        def __init__(self, *args, mounts=None, **kwargs):
            init(self, *args, mounts={pattern: make(httpx), **(mounts or {})}, **kwargs)
        __init__.__wrapped__ = init
        cls.__init__ = __init__

    wrap(httpx.Client, Transport.for_library)
    wrap(httpx.AsyncClient, AsyncTransport.for_library)
    httpx._aiosd_patched = True


# --- OpenAI request -> syscall ----------------------------------------------------------------------------
def _text(content, where: str) -> str:
    """A message's content: a string, or a list of text parts (anything else is refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}[{i}]: only text parts are supported by this model", param=where)
            out.append(part["text"])
        return "".join(out)
    raise APIError(400, f"{where} must be a string or a list of text parts", param=where)


def chat_messages(messages) -> list[dict]:
    """OpenAI chat messages as the ABI's ``{role, content}`` list.  An assistant turn's ``tool_calls`` are
    written as the JSON the kernel's constrained tool calls make the model emit; a ``tool`` result becomes a
    user turn naming the tool (the default model's template has no tool role)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    names: dict[str, str] = {}
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object", param=where)
        role = m.get("role")
        content = _text(m.get("content"), f"{where}.content")
        if role in ("system", "developer"):
            out.append({"role": "system", "content": content})
        elif role == "user":
            out.append({"role": "user", "content": content})
        elif role == "assistant":
            calls = []
            for call in m.get("tool_calls") or []:
                fn = call.get("function") or {} if isinstance(call, dict) else {}
                try:
                    arguments = json.loads(fn.get("arguments") or "{}")
                except (TypeError, ValueError):
                    arguments = fn.get("arguments")
                names[str(call.get("id"))] = str(fn.get("name"))
                calls.append(json.dumps({"name": fn.get("name"), "arguments": arguments}, ensure_ascii=False))
            out.append({"role": "assistant", "content": "\n".join(filter(None, [content, *calls]))})
        elif role in ("tool", "function"):
            name = m.get("name") or names.get(str(m.get("tool_call_id")), "the tool")
            out.append({"role": "user", "content": f"Result of {name}: {content}"})
        else:
            raise APIError(400, f"{where}.role must be system, developer, user, assistant or tool, got {role!r}",
                           param=f"{where}.role")
    return out


def _sampling(body: dict) -> dict:
    args: dict[str, Any] = {}
    if body.get("n") not in (None, 1):
        raise APIError(400, "n must be 1 (send several requests: the kernel batches them)", param="n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise APIError(400, "logprobs are not supported by this kernel", param="logprobs")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        args["max_tokens"] = max_tokens
    for key in ("temperature", "top_p", "seed"):
        if body.get(key) is not None:
            args[key] = body[key]
    stop = body.get("stop")
    if stop is not None:
        args["stop"] = [stop] if isinstance(stop, str) else stop
    return args


def chat_request(body: dict, models: list[str]) -> tuple[str, dict]:
    """``(model served, llm.chat args)`` for a ``/v1/chat/completions`` body."""
    args = _sampling(body)
    args["messages"] = chat_messages(body.get("messages"))
    tools = body.get("tools")
    if tools:
        specs = []
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise APIError(400, f"tools[{i}] must be {{type: function, function: {{name, ...}}}}",
                               param=f"tools[{i}]")
            specs.append({"name": fn["name"], "description": fn.get("description", ""),
                          "parameters": fn.get("parameters") or {"type": "object", "properties": {}}})
        args["tools"] = specs
        choice = body.get("tool_choice", "auto")
        if isinstance(choice, dict):
            choice = {"name": (choice.get("function") or {}).get("name")}
        args["tool_choice"] = choice
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise APIError(400, "response_format.json_schema.schema must be a JSON Schema object",
                           param="response_format")
        args["json_schema"] = schema
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        args["json_schema"] = {"type": "object"}
    return _model(body, models, args), args


def completion_request(body: dict, models: list[str]) -> tuple[str, dict]:
    """``(model served, llm.generate args)`` for a ``/v1/completions`` body."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "prompt must be a string (one prompt per request: the kernel batches requests)",
                       param="prompt")
    if body.get("echo") or body.get("suffix") or body.get("best_of") not in (None, 1):
        raise APIError(400, "echo, suffix and best_of are not supported", param="prompt")
    args = _sampling(body)
    args["prompt"] = prompt
    return _model(body, models, args), args


def _model(body: dict, models: list[str], args: dict) -> str:
    """The model that serves the request: the one named if the kernel has it, else the default (first)."""
    name = body.get("model")
    if name in models:
        args["model"] = name
        return name
    return models[0]


# --- syscall result -> OpenAI response --------------------------------------------------------------------
def usage(u: dict) -> dict:
    prompt, completion = u.get("prompt_tokens", 0), u.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": u.get("cached_tokens", 0)}}


def chat_response(rid: int, model: str, result: dict) -> dict:
    calls = result.get("tool_calls") or []
    message = {"role": "assistant", "content": None if calls else result["text"], "refusal": None}
    if calls:
        message["tool_calls"] = calls
    return {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": result["finish_reason"],
                         "logprobs": None}],
            "usage": usage(result.get("usage", {}))}


def completion_response(rid: int, model: str, result: dict) -> dict:
    return {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": result["text"], "finish_reason": result["finish_reason"],
                         "logprobs": None}],
            "usage": usage(result.get("usage", {}))}


class _Events:
    """The server-sent events of one streamed answer, built from the kernel's chunks."""

    def __init__(self, kind: str, rid: int, model: str, include_usage: bool):
        self.kind, self.model, self.include_usage = kind, model, include_usage
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{rid}"
        self.created = int(time.time())

    def _event(self, choices: list, **extra) -> bytes:
        obj = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
               "created": self.created, "model": self.model, "choices": choices, **extra}
        return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

    def start(self) -> bytes:
        if self.kind != "chat":
            return b""
        return self._event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                             "logprobs": None}])

    def piece(self, text: str) -> bytes:
        if self.kind == "chat":
            return self._event([{"index": 0, "delta": {"content": text}, "finish_reason": None, "logprobs": None}])
        return self._event([{"index": 0, "text": text, "finish_reason": None, "logprobs": None}])

    def end(self, result: dict) -> bytes:
        out = b""
        calls = result.get("tool_calls") or []
        if self.kind == "chat":
            delta = {"tool_calls": [dict(c, index=i) for i, c in enumerate(calls)]} if calls else {}
            if calls or result.get("text") and not result.get("_streamed"):
                delta.setdefault("content", None if calls else result["text"])
            out += self._event([{"index": 0, "delta": delta, "finish_reason": result["finish_reason"],
                                 "logprobs": None}])
        else:
            out += self._event([{"index": 0, "text": "", "finish_reason": result["finish_reason"],
                                 "logprobs": None}])
        if self.include_usage:
            out += self._event([], usage=usage(result.get("usage", {})))
        return out + b"data: [DONE]\n\n"

    @staticmethod
    def error(exc: SyscallError) -> bytes:
        return b"data: " + json.dumps(error_body(exc.code, exc.message)).encode() + b"\n\n"


def error_body(code: str, message: str, param: str | None = None) -> dict:
    status, kind, _ = STATUS.get(code, (500, "server_error", True))
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --- the transports ---------------------------------------------------------------------------------------
class _Route:
    """One HTTP request, decoded: what to call and how to answer.  Shared by both transports."""

    def __init__(self, method: str, path: str, body: bytes, models_of):
        self.stream = False
        self.include_usage = False
        self.kind = ""
        path = path.rstrip("/")
        if not path.startswith("/v1/"):
            raise APIError(404, f"no such endpoint {path!r}: the kernel serves /v1/chat/completions, "
                           "/v1/completions and /v1/models", code="unknown_url")
        route = path[len("/v1"):]
        if method == "GET" and (route == "/models" or route.startswith("/models/")):
            self.kind, self.name = "models", route[len("/models/"):] if route != "/models" else None
            self.models = models_of()
            return
        if method != "POST" or route not in ("/chat/completions", "/completions"):
            raise APIError(404, f"no such endpoint: {method} {path}", code="unknown_url")
        try:
            obj = json.loads(body or b"{}")
        except ValueError:
            raise APIError(400, "the request body is not JSON") from None
        if not isinstance(obj, dict):
            raise APIError(400, "the request body must be a JSON object")
        models = models_of()
        if route == "/chat/completions":
            self.kind, self.call = "chat", "llm.chat"
            self.model, self.args = chat_request(obj, models)
        else:
            self.kind, self.call = "completion", "llm.generate"
            self.model, self.args = completion_request(obj, models)
        self.stream = bool(obj.get("stream"))
        self.include_usage = bool((obj.get("stream_options") or {}).get("include_usage"))
        # The kernel streams text only; a tool call comes whole, so it is sent as one event at the end.
        self.kernel_stream = self.stream and not self.args.get("tools")

    def models_body(self) -> tuple[int, dict]:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "aiosd"} for m in self.models]
        if self.name is None:
            return 200, {"object": "list", "data": data}
        for d in data:
            if d["id"] == self.name:
                return 200, d
        return 404, error_body("ENOENT", f"no model named {self.name!r}; this kernel serves "
                               f"{', '.join(self.models)}")

    def answer(self, rid: int, result: dict) -> dict:
        return (chat_response if self.kind == "chat" else completion_response)(rid, self.model, result)

    def events(self, rid: int) -> _Events:
        return _Events(self.kind, rid, self.model, self.include_usage)


def _models_of(client: _client.Client, cache: dict):
    def models() -> list[str]:
        if "names" not in cache:  # the default first: it answers names the kernel does not serve
            got = client.call("llm.models")["models"]
            cache["names"] = [m["name"] for m in sorted(got, key=lambda m: not m["default"])]
        return cache["names"]
    return models


def _read_timeout(request) -> float | None:
    timeout = request.extensions.get("timeout") or {}
    return timeout.get("read")


class Transport:
    """An ``httpx.BaseTransport`` (of whichever library ``httpx`` is) answering OpenAI's API through the
    agent's syscall connection (``client``, default: the agent's own)."""

    @classmethod
    def for_library(cls, httpx, client: _client.Client | None = None):
        base = httpx.BaseTransport if cls is Transport else httpx.AsyncBaseTransport
        kind = type(f"Kernel{base.__name__}", (cls, base), {})
        return kind(httpx, client)

    def __init__(self, httpx, client: _client.Client | None = None):
        self.httpx = httpx
        self._client = client
        self._cache: dict = {}

    @property
    def client(self) -> _client.Client:
        return self._client or _client.default()

    def _json(self, request, status: int, obj: dict, retry: bool | None = None):
        headers = {"content-type": "application/json"}
        if retry is not None:
            headers["x-should-retry"] = "true" if retry else "false"
        return self.httpx.Response(status, headers=headers, content=json.dumps(obj).encode(), request=request)

    def _error(self, request, exc: Exception):
        if isinstance(exc, APIError):
            return self._json(request, exc.status, {"error": {"message": exc.message, "type":
                              "invalid_request_error", "param": exc.param, "code": exc.code}}, retry=False)
        status, _, retry = STATUS.get(exc.code, (500, "server_error", True))
        return self._json(request, status, error_body(exc.code, exc.message), retry=retry)

    def _sse(self, request, events: type, *args):
        """A 200 event stream whose body is ``events(*args)`` made a byte stream of this HTTP library."""
        base = self.httpx.SyncByteStream if events is _SyncEvents else self.httpx.AsyncByteStream
        body = type(events.__name__, (events, base), {})(*args)
        return self.httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=body,
                                   request=request)

    def handle_request(self, request):
        try:
            route = _Route(request.method, request.url.path, request.read(), _models_of(self.client, self._cache))
            if route.kind == "models":
                return self._json(request, *route.models_body())
            client, timeout = self.client, _read_timeout(request)
            rid = client.send(route.call, dict(route.args, stream=True) if route.kernel_stream else route.args)
            first = client.next_message(rid, timeout)
            if not route.stream:
                return self._json(request, 200, route.answer(rid, _client.result_of(first)))
            if "seq" not in first:
                _client.result_of(first)  # an error before any text: a proper HTTP error
            return self._sse(request, _SyncEvents, client, rid, route, first, timeout)
        except (APIError, SyscallError) as exc:
            if isinstance(exc, SyscallError) and exc.code == "ETIMEDOUT":
                raise self.httpx.ReadTimeout(str(exc), request=request) from None
            return self._error(request, exc)

    def close(self) -> None:
        pass


class AsyncTransport(Transport):
    """``Transport`` for ``AsyncClient`` (``AsyncOpenAI``): the same answers, waiting without blocking."""

    async def handle_async_request(self, request):
        try:
            body = await request.aread()
            route = _Route(request.method, request.url.path, body, _models_of(self.client, self._cache))
            if route.kind == "models":
                return self._json(request, *route.models_body())
            client, timeout = self.client, _read_timeout(request)
            rid = client.send(route.call, dict(route.args, stream=True) if route.kernel_stream else route.args)
            first = await client.anext_message(rid, timeout)
            if not route.stream:
                return self._json(request, 200, route.answer(rid, _client.result_of(first)))
            if "seq" not in first:
                _client.result_of(first)
            return self._sse(request, _AsyncEvents, client, rid, route, first, timeout)
        except (APIError, SyscallError) as exc:
            if isinstance(exc, SyscallError) and exc.code == "ETIMEDOUT":
                raise self.httpx.ReadTimeout(str(exc), request=request) from None
            return self._error(request, exc)

    async def aclose(self) -> None:
        pass


class _EventsBase:
    """A streamed answer's body; closing it before the end cancels the generation (``llm.cancel``)."""

    def __init__(self, client, rid, route, first, timeout):
        self.client, self.rid, self.route, self.first, self.timeout = client, rid, route, first, timeout
        self.events = route.events(rid)
        self.done = False

    def _step(self, msg: dict) -> bytes:
        """The bytes for one kernel message; ``done`` after the reply."""
        if "seq" in msg:
            return self.events.piece(msg["chunk"]["text"])
        self.done = True
        try:
            result = _client.result_of(msg)
        except SyscallError as exc:
            return _Events.error(exc)
        if not self.route.kernel_stream:  # a whole answer (tool calls): its text was never streamed
            return self.events.end(result)
        return self.events.end(dict(result, _streamed=True))

    def _cancel(self) -> None:
        if not self.done:
            self.done = True
            try:
                self.client.discard(self.client.send("llm.cancel", {"id": self.rid}))
            except Exception:  # the connection is gone: the kernel cancels the agent's requests itself
                pass
            self.client.discard(self.rid)  # its ECANCELED reply is dropped on arrival


class _SyncEvents(_EventsBase):
    def __iter__(self):
        yield self.events.start()
        msg = self.first
        while True:
            yield self._step(msg)
            if self.done:
                return
            msg = self.client.next_message(self.rid, self.timeout)

    def close(self) -> None:
        self._cancel()


class _AsyncEvents(_EventsBase):
    async def __aiter__(self):
        yield self.events.start()
        msg = self.first
        while True:
            yield self._step(msg)
            if self.done:
                return
            msg = await self.client.anext_message(self.rid, self.timeout)

    async def aclose(self) -> None:
        self._cancel()
