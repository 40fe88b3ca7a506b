"""Durable, versioned storage for agents: ``storage.put(key, data)``, ``storage.get(key)`` (docs/abi.md, "Storage").

    from agentproc import storage
    storage.put("notes/today.md", "Paris is the capital of France.")
    print(storage.get("notes/today.md").text)
    for entry in storage.list("notes/"):
        print(entry.key, entry.size, entry.version)

Keys are relative paths in the agent's own namespace (its launch name: a relaunched agent of the same name
finds its data).  A returned write is on disk.  Values larger than a frame are sent in parts and read in ranges
by these functions themselves.  Errors are the ABI's exceptions (``agentproc.errors``): ``EINVAL`` for a bad
key, ``ENOENT``, ``EDQUOT`` past the namespace's quota, ``ESTALE`` when ``if_version`` no longer holds (read,
merge, retry), ``E2BIG`` past the largest value.
"""
from __future__ import annotations

from typing import Iterator

from agentproc.client import Client, default

PART_BYTES = 256 << 10  # bytes per storage.put part, at most: less where the kernel's max_frame is smaller
ENVELOPE_BYTES = 8192  # room for the rest of a put's frame (key, namespace, content type...)
_part_bytes: dict[int, int] = {}  # id(client) -> part size, from the kernel's max_frame (proc.self)


def _part_size(client: Client) -> int:
    """Bytes of value per part: a frame over 2 x max_frame would make the kernel drop the connection."""
    size = _part_bytes.get(id(client))
    if size is None:
        max_frame = client.call("proc.self").get("max_frame", 65536)
        size = _part_bytes[id(client)] = max(256, min(PART_BYTES, max_frame - ENVELOPE_BYTES, max_frame // 2))
    return size


class Version:
    """One version of a key: ``key``, ``version``, ``size``, ``sha256``, ``content_type``, ``mtime`` (unix
    time), ``deleted`` (a tombstone); ``versions`` (how many are kept) from ``stat`` only."""

    __slots__ = ("key", "version", "size", "sha256", "content_type", "mtime", "deleted", "versions")

    def __init__(self, key: str, version: int, size: int, sha256: str, content_type: str, mtime: float,
                 deleted: bool = False, versions: int | None = None, **_ignored):
        self.key, self.version, self.size, self.sha256 = key, version, size, sha256
        self.content_type, self.mtime, self.deleted, self.versions = content_type, mtime, deleted, versions

    def __repr__(self) -> str:
        return f"Version({self.key!r} v{self.version}, {self.size} bytes{', deleted' if self.deleted else ''})"


class Value(Version):
    """A version with its content: ``data`` (bytes); ``text`` decodes it as UTF-8."""

    __slots__ = ("data",)

    def __init__(self, data: bytes, **fields):
        super().__init__(**fields)
        self.data = data

    @property
    def text(self) -> str:
        """The value decoded as UTF-8 (``UnicodeDecodeError`` for binary data: read ``data`` instead)."""
        return self.data.decode("utf-8")


def _call(name: str, args: dict, namespace: str | None, client: Client | None):
    if namespace is not None:
        args["namespace"] = namespace
    return (client or default()).call(name, args)


def put(key: str, data: bytes | str, *, content_type: str | None = None, if_version: int | None = None,
        namespace: str | None = None, client: Client | None = None) -> Version:
    """Write ``data`` as the new version of ``key`` and return it once it is on disk.  ``if_version``: only if
    the key's newest version is that one (0: only if it does not exist), else ``ESTALE`` and nothing written.
    Large values go in parts (``final`` only on the last); ``if_version`` is checked by the last."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if isinstance(data, str) and content_type is None:
        content_type = "text/plain; charset=utf-8"
    client = client or default()
    part, offset = _part_size(client), 0
    while True:
        chunk = raw[offset:offset + part]
        final = offset + len(chunk) >= len(raw)
        args = {"key": key, "data": chunk, "offset": offset, "final": final}
        if content_type is not None:
            args["content_type"] = content_type
        if final and if_version is not None:
            args["if_version"] = if_version
        try:
            result = _call("storage.put", args, namespace, client)
        except Exception:
            if offset:  # give back what the upload staged (it counts against the quota until it expires)
                _call("storage.put", {"key": key, "data": b"", "final": False}, namespace, client)
            raise
        if final:
            return Version(**result)
        offset += len(chunk)


def get(key: str, *, version: int | None = None, namespace: str | None = None,
        client: Client | None = None) -> Value:
    """The content of ``key`` (its newest version, or ``version``), read range by range; ``ENOENT`` if it is
    missing or deleted.  A range is read from the same version as the first, so a concurrent write cannot mix
    two versions."""
    args: dict = {"key": key}
    if version is not None:
        args["version"] = version
    first = _call("storage.get", dict(args), namespace, client)
    parts, offset = [first["data"]], len(first["data"])
    while not first["eof"] and offset < first["size"]:
        more = _call("storage.get", {"key": key, "version": first["version"], "offset": offset}, namespace, client)
        parts.append(more["data"])
        offset += len(more["data"])
    fields = {k: v for k, v in first.items() if k not in ("data", "offset", "eof")}
    return Value(b"".join(parts), **fields)


def stat(key: str, *, namespace: str | None = None, client: Client | None = None) -> Version:
    """The newest version of ``key`` (with ``versions``, how many are kept); ``ENOENT`` if missing or deleted."""
    return Version(**_call("storage.stat", {"key": key}, namespace, client))


def list(prefix: str = "", *, namespace: str | None = None, client: Client | None = None,  # noqa: A001
         page: int = 1000) -> Iterator[Version]:
    """Every live key starting with ``prefix``, in key order, fetched ``page`` at a time."""
    after = ""
    while True:
        result = _call("storage.list", {"prefix": prefix, "after": after, "limit": page}, namespace, client)
        for entry in result["entries"]:
            yield Version(**entry)
        if not result["more"] or not result["entries"]:
            return
        after = result["entries"][-1]["key"]


def delete(key: str, *, if_version: int | None = None, purge: bool = False, namespace: str | None = None,
           client: Client | None = None) -> dict:
    """Delete ``key``: a tombstone version (``rollback`` undoes it), or with ``purge`` its whole history (and
    the space it counted against the quota)."""
    args: dict = {"key": key, "purge": purge}
    if if_version is not None:
        args["if_version"] = if_version
    return _call("storage.delete", args, namespace, client)


def versions(key: str, *, namespace: str | None = None, client: Client | None = None) -> list[Version]:
    """Every kept version of ``key``, newest first (deletions included)."""
    return [Version(key=key, **v) for v in _call("storage.versions", {"key": key}, namespace, client)["versions"]]


def rollback(key: str, version: int, *, if_version: int | None = None, namespace: str | None = None,
             client: Client | None = None) -> Version:
    """Make the content of ``version`` the newest version of ``key`` (a new version: nothing is lost)."""
    args: dict = {"key": key, "version": version}
    if if_version is not None:
        args["if_version"] = if_version
    return Version(**_call("storage.rollback", args, namespace, client))
