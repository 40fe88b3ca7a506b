"""Long-term memory for agents: ``memory.add(text)``, ``memory.search(query)`` (docs/abi.md, "Memory").

    from agentproc import memory
    memory.add("The user prefers answers in French.", {"kind": "preference"})
    for hit in memory.search("which language should I answer in?", k=3):
        print(hit.score, hit.text)

Entries live in the agent's own namespace (its launch name, as its storage), survive its exit and the kernel's
restart, and are searched by meaning (an embedder in the kernel, offline) and by keyword.  Errors are the ABI's
exceptions: ``EINVAL`` (bounds: the message names the rule), ``E2BIG`` (text too long: split it), ``ENOENT``
(no such entry in this namespace), ``EDQUOT`` (the namespace's storage quotas, which memory shares).
"""
from __future__ import annotations

from typing import Iterator

from agentproc.client import Client, default


class Entry:
    """A memory entry: ``id``, ``text``, ``metadata``, ``created_at`` (unix time), ``size`` (bytes counted
    against the quota); from ``search`` also ``score`` (higher is better)."""

    __slots__ = ("id", "text", "metadata", "created_at", "size", "score")

    def __init__(self, id: int, text: str, metadata: dict | None = None, created_at: float | None = None,  # noqa: A002
                 size: int | None = None, score: float | None = None, **_ignored):
        self.id, self.text, self.metadata = id, text, metadata or {}
        self.created_at, self.size, self.score = created_at, size, score

    def __repr__(self) -> str:
        score = f", score={self.score:.3f}" if self.score is not None else ""
        return f"Entry({self.id}, {self.text[:40]!r}{score})"


def _call(name: str, args: dict, namespace: str | None, client: Client | None):
    if namespace is not None:
        args["namespace"] = namespace
    return (client or default()).call(name, args)


def add(text: str, metadata: dict | None = None, *, namespace: str | None = None,
        client: Client | None = None) -> int:
    """Remember ``text`` (with ``metadata``: str keys, str/int/float/bool values); returns its id once it is on
    disk."""
    args: dict = {"text": text}
    if metadata:
        args["metadata"] = metadata
    return _call("memory.add", args, namespace, client)["id"]


def get(entry_id: int, *, namespace: str | None = None, client: Client | None = None) -> Entry:
    """The entry ``entry_id`` (paged back into RAM if it was evicted); ``ENOENT`` if it is not this namespace's."""
    return Entry(**_call("memory.get", {"id": entry_id}, namespace, client))


def list(*, filter: dict | None = None, namespace: str | None = None, client: Client | None = None,  # noqa: A001,A002
         page: int = 1000) -> Iterator[Entry]:
    """Every entry (texts cut to 200 characters: ``get`` one for all of it), in id order, matching ``filter``
    (exact metadata values) if given."""
    after = 0
    while True:
        args: dict = {"after": after, "limit": page}
        if filter:
            args["filter"] = filter
        result = _call("memory.list", args, namespace, client)
        for entry in result["entries"]:
            yield Entry(**entry)
        if not result["more"] or not result["entries"]:
            return
        after = result["entries"][-1]["id"]


def delete(entry_id: int, *, namespace: str | None = None, client: Client | None = None) -> None:
    """Forget the entry ``entry_id``; ``ENOENT`` if it is not this namespace's."""
    _call("memory.delete", {"id": entry_id}, namespace, client)


def search(query: str, k: int = 5, *, filter: dict | None = None, mode: str = "hybrid",
           namespace: str | None = None, client: Client | None = None) -> list[Entry]:
    """The ``k`` entries that best match ``query``, best first: ``mode`` "hybrid" (meaning and keywords,
    the default), "embedding" (meaning only) or "keyword" (BM25 only); ``filter``: exact metadata values."""
    args: dict = {"query": query, "k": k, "mode": mode}
    if filter:
        args["filter"] = filter
    return [Entry(**hit) for hit in _call("memory.search", args, namespace, client)["hits"]]


def stats(*, namespace: str | None = None, client: Client | None = None) -> dict:
    """Entries resident in RAM and evicted to disk, hits, misses, evictions, page-ins; ``usage`` (entries and
    bytes, counted against the namespace's storage quotas)."""
    return _call("memory.stats", {}, namespace, client)
