"""LLM syscalls for agents: ``llm.generate(prompt, ...)`` and ``llm.chat(messages, ...)`` (docs/abi.md 4).

Without ``stream`` they return a ``Completion``; with ``stream=True`` a ``TextStream`` that yields text pieces
as the model produces them and holds the ``Completion`` in ``.completion`` once exhausted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from agentproc.client import Client, default


@dataclass
class Completion:
    text: str
    finish_reason: str
    usage: dict

    def __str__(self) -> str:
        return self.text


class TextStream:
    def __init__(self, stream):
        self._stream = stream
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        for chunk in self._stream:
            yield chunk["text"]
        self.completion = Completion(**self._stream.result)


def _call(name: str, args: dict, stream: bool, client: Client | None):
    client = client or default()
    if stream:
        return TextStream(client.stream(name, args))
    return Completion(**client.call(name, args))


def generate(prompt: str, *, stream: bool = False, client: Client | None = None, **params):
    """Complete ``prompt``.  ``params``: max_tokens, temperature, top_k, top_p, seed, stop."""
    return _call("llm.generate", {"prompt": prompt, **params}, stream, client)


def chat(messages: list[dict], *, stream: bool = False, client: Client | None = None, **params):
    """Answer a conversation (``[{"role": "user", "content": "..."}]``) with the model's chat template."""
    return _call("llm.chat", {"messages": messages, **params}, stream, client)
