"""LLM syscalls for agents: ``llm.generate(prompt, ...)`` and ``llm.chat(messages, ...)`` (docs/abi.md 4).

Without ``stream`` they return a ``Completion``; with ``stream=True`` a ``TextStream`` that yields text pieces
as the model produces them and holds the ``Completion`` in ``.completion`` once exhausted.  The coroutines
``agenerate`` and ``achat`` do the same without blocking an event loop (``async for piece in
await llm.achat(..., stream=True)``); any number may be in flight from one agent, up to ``[kernel]
max_pending`` (EAGAIN past it).
"""
from __future__ import annotations

from typing import AsyncIterator, Iterator

from agentproc.client import Client, default
from agentproc.records import Model


class Completion:
    """A finished generation: ``text``, ``finish_reason`` ("stop" | "length"), ``usage`` (token counts).
    Result keys this SDK does not know yet are kept in ``extra`` (docs/abi.md 6: clients ignore them)."""

    __slots__ = ("text", "finish_reason", "usage", "extra")

    def __init__(self, text: str, finish_reason: str, usage: dict, **extra):
        self.text, self.finish_reason, self.usage, self.extra = text, finish_reason, usage, extra

    def __str__(self) -> str:
        return self.text

    @property
    def tool_calls(self) -> list[dict]:
        """The tool calls of an ``llm.chat(..., tools=...)`` answer, OpenAI-shaped: ``[{"id", "type":
        "function", "function": {"name", "arguments" (a JSON string)}}]``; empty otherwise."""
        return self.extra.get("tool_calls", [])

    def __repr__(self) -> str:
        return f"Completion(text={self.text!r}, finish_reason={self.finish_reason!r}, usage={self.usage!r})"


class TextStream:
    """The text pieces of a streamed generation, with ``for`` or ``async for``; ``completion`` once ended.
    ``id`` is the request id (``cancel(stream.id)`` ends it early)."""

    def __init__(self, stream):
        self._stream = stream
        self.id: int = stream.rid
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        for chunk in self._stream:
            yield chunk["text"]
        self.completion = Completion(**self._stream.result)

    async def __aiter__(self) -> AsyncIterator[str]:
        async for chunk in self._stream:
            yield chunk["text"]
        self.completion = Completion(**self._stream.result)

    def __await__(self):  # ``await llm.achat(..., stream=True)`` gives the stream itself
        async def itself():
            return self
        return itself().__await__()


def _call(name: str, args: dict, stream: bool, client: Client | None):
    client = client or default()
    if stream:
        return TextStream(client.stream(name, args))
    return Completion(**client.call(name, args))


def _acall(name: str, args: dict, stream: bool, client: Client | None):
    client = client or default()
    if stream:
        return TextStream(client.stream(name, args))

    rid = client.send(name, args)  # sent now: requests made before the first await are in flight together

    async def answer() -> Completion:
        from agentproc.client import result_of
        while True:
            msg = await client.anext_message(rid)
            if "seq" not in msg:
                return Completion(**result_of(msg))
    return answer()


def generate(prompt: str, *, stream: bool = False, client: Client | None = None, **params):
    """Complete ``prompt``.  ``params``: max_tokens, temperature, top_k, top_p, seed, stop."""
    return _call("llm.generate", {"prompt": prompt, **params}, stream, client)


def chat(messages: list[dict], *, stream: bool = False, client: Client | None = None, **params):
    """Answer a conversation (``[{"role": "user", "content": "..."}]``) with the model's chat template.
    ``tools=["calculator", ...]`` (and ``tool_choice``) makes the model answer with a tool call whose arguments
    match the tool's schema: ``.tool_calls`` (docs/abi.md, llm.chat)."""
    return _call("llm.chat", {"messages": messages, **params}, stream, client)


def agenerate(prompt: str, *, stream: bool = False, client: Client | None = None, **params):
    """``generate`` for coroutines: ``await llm.agenerate(prompt)`` -> ``Completion``; with ``stream=True``
    a ``TextStream``: ``async for piece in llm.agenerate(prompt, stream=True)``.  The request is sent at the
    call, so several are in flight before the first ``await``."""
    return _acall("llm.generate", {"prompt": prompt, **params}, stream, client)


def achat(messages: list[dict], *, stream: bool = False, client: Client | None = None, **params):
    """``chat`` for coroutines: ``await llm.achat(messages)`` -> ``Completion``; with ``stream=True`` a
    ``TextStream``: ``async for piece in llm.achat(messages, stream=True)``."""
    return _acall("llm.chat", {"messages": messages, **params}, stream, client)


def cancel(request_id: int, *, client: Client | None = None) -> bool:
    """End one of this agent's own requests in flight (a ``TextStream``'s ``id``); False if it had ended."""
    return (client or default()).call("llm.cancel", {"id": request_id})["cancelled"]


def models(*, client: Client | None = None) -> list[Model]:
    """The models the kernel serves: ``[Model(name, default, n_ctx_seq, kind)]`` (``model=NAME`` picks one)."""
    return [Model(m) for m in (client or default()).call("llm.models")["models"]]


def chat_all(requests: list[dict], *, client: Client | None = None) -> list:
    """Send several ``llm.chat`` requests at once -- each a map of ``messages`` and parameters -- so the kernel
    decodes them together in its batch, and return their answers in order: a ``Completion``, or the ABI error
    (an ``agentproc.errors`` exception, returned rather than raised) for a request that failed.  An agent has at
    most ``[kernel] max_pending`` requests in flight (EAGAIN past it)."""
    from agentproc.client import result_of
    from agentproc.errors import SyscallError

    client = client or default()
    rids = [client.send("llm.chat", dict(r)) for r in requests]
    answers = []
    for rid in rids:
        try:
            answers.append(Completion(**result_of(client.next_message(rid))))
        except SyscallError as exc:
            answers.append(exc)
    return answers
