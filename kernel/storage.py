"""The storage manager: durable, versioned key/value storage per namespace, in one SQLite file (docs/storage.md).

Spec: docs/abi.md, "Storage".  Every method is one SQLite transaction, committed before it returns
(``journal_mode=WAL``, ``synchronous=FULL``: a commit is fsynced, so an acknowledged write survives a crash of
the kernel or of the machine).  The kernel calls the writes from one worker thread (kernel/worker.py): that
thread is the one writer, and no lock is held across an agent's calls.  Reads go through a second connection
that WAL lets read beside the writer (they see the last commit and never wait for an fsync), bounded in what
they return (``max_read`` bytes, ``list``'s limit), so the kernel serves them on its event loop.

Tables::

    objects(id, ns, key, version, size, sha256, content_type, mtime, deleted, data)   one row per kept version
    keys(ns, key, latest, deleted)                                                    one row per key with history
    parts(ns, key, offset, data, content_type, updated)                               an upload in progress
    usage(ns, bytes, keys)                                                            what the quotas count

A delete writes a tombstone version (``deleted``), so it can be rolled back; ``purge`` removes a key's whole
history.  Retention prunes old versions after each write (``keep_versions``, ``keep_bytes``).  Large values are
read in ranges through SQLite's incremental blob I/O, never loaded whole.

Backends.  ``Backend`` is the interface the kernel uses (kernel/sys_storage.py, kernel/access.py, the storage
worker); ``Storage`` is its SQLite implementation, and ``open_storage`` the one place that picks a backend
(``[storage] backend``) and turns a backend's own errors (``sqlite3.Error``) into ``StorageUnavailable``, so
that the kernel never names SQLite.  A second backend -- a network database such as PostgreSQL shared by the
kernels of several machines (docs/scale.md) -- implements ``Backend`` with the same contracts (one transaction
a call, durable before it returns, quotas checked inside that transaction) and adds its name to
``BACKENDS``.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
import unicodedata
from typing import Protocol

from syscalls.errors import SyscallError

MB = 1 << 20
MAX_KEY_BYTES = 1024
MAX_COMPONENTS = 32
MAX_COMPONENT_BYTES = 255
MAX_CONTENT_TYPE = 255
RESERVED_PREFIX = ".aiosd"  # first components beginning with this are the kernel's (e.g. memory)
TEXT_TYPE = "text/plain; charset=utf-8"
BINARY_TYPE = "application/octet-stream"
EXPIRE_EVERY_S = 60.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS objects(
    id INTEGER PRIMARY KEY, ns TEXT NOT NULL, key TEXT NOT NULL, version INTEGER NOT NULL,
    size INTEGER NOT NULL, sha256 TEXT NOT NULL, content_type TEXT NOT NULL, mtime REAL NOT NULL,
    deleted INTEGER NOT NULL, data BLOB NOT NULL, UNIQUE(ns, key, version));
CREATE TABLE IF NOT EXISTS keys(
    ns TEXT NOT NULL, key TEXT NOT NULL, latest INTEGER NOT NULL, deleted INTEGER NOT NULL,
    PRIMARY KEY(ns, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS parts(
    ns TEXT NOT NULL, key TEXT NOT NULL, offset INTEGER NOT NULL, data BLOB NOT NULL,
    content_type TEXT NOT NULL, updated REAL NOT NULL, PRIMARY KEY(ns, key, offset));
CREATE INDEX IF NOT EXISTS parts_updated ON parts(updated);
CREATE TABLE IF NOT EXISTS usage(
    ns TEXT PRIMARY KEY, bytes INTEGER NOT NULL, keys INTEGER NOT NULL) WITHOUT ROWID;
"""


class StorageError(SyscallError):
    """An ABI error (``code``: EINVAL, ENOENT, EDQUOT, E2BIG, ESTALE) with a message saying what to do."""

    def __init__(self, code: str, message: str):
        super().__init__(message, code)


def check_key(key) -> str:
    """``key`` if it is a valid key (docs/abi.md, "Storage"); else ``StorageError("EINVAL")`` naming the rule.
    Keys are checked, never rewritten: ``a//b`` or ``./a`` is refused, not normalised."""
    if not isinstance(key, str):
        raise StorageError("EINVAL", "key must be a string")
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError:
        raise StorageError("EINVAL", "key must be valid UTF-8 (it holds a lone surrogate)") from None
    if not 1 <= len(raw) <= MAX_KEY_BYTES:
        raise StorageError("EINVAL", f"key must be 1..{MAX_KEY_BYTES} bytes of UTF-8, got {len(raw)}")
    bad = next((c for c in key if unicodedata.category(c) == "Cc" or c == "\\"), None)
    if bad is not None:
        raise StorageError("EINVAL", f"key may not contain control characters, NUL or backslash (found "
                                     f"{bad!r}); use '/' to separate components")
    if key.startswith("/"):
        raise StorageError("EINVAL", f"key {key!r} is absolute; keys are relative paths such as 'notes/a.md'")
    parts = key.split("/")
    if len(parts) > MAX_COMPONENTS:
        raise StorageError("EINVAL", f"key has {len(parts)} components; the limit is {MAX_COMPONENTS}")
    for part in parts:
        if part == "":
            raise StorageError("EINVAL", f"key {key!r} has an empty component (a trailing or double '/')")
        if part in (".", ".."):
            raise StorageError("EINVAL", f"key {key!r} has a {part!r} component; keys are not resolved, so "
                                         "name the entry directly")
        if len(part.encode()) > MAX_COMPONENT_BYTES:
            raise StorageError("EINVAL", f"a component of the key is over {MAX_COMPONENT_BYTES} bytes")
    if parts[0].startswith(RESERVED_PREFIX):
        raise StorageError("EINVAL", f"keys beginning with {RESERVED_PREFIX!r} are reserved for the kernel")
    return key


class StorageUnavailable(OSError):
    """The storage backend could not be opened (the message says what to check)."""


class Backend(Protocol):
    """What the kernel needs of a storage backend.  Every write is one transaction, durable before it returns,
    rolled back whole on error; reads see the last commit; errors are ``StorageError`` with an ABI code.
    Quotas are passed per call (``quota_bytes``, ``quota_keys``: None = none) and checked in the write's own
    transaction (two kernels writing one namespace must not both pass a quota check)."""

    def put(self, ns: str, key: str, data: bytes | str, *, content_type: str | None = None,
            if_version: int | None = None, offset: int = 0, final: bool = True, quota_bytes: int | None = None,
            quota_keys: int | None = None) -> dict: ...
    def get(self, ns: str, key: str, *, version: int | None = None, offset: int = 0,
            length: int | None = None) -> dict: ...
    def stat(self, ns: str, key: str) -> dict: ...
    def exists(self, ns: str, key: str) -> bool: ...
    def list(self, ns: str, prefix: str = "", *, after: str = "", limit: int = 100) -> dict: ...
    def delete(self, ns: str, key: str, *, if_version: int | None = None, purge: bool = False) -> dict: ...
    def versions(self, ns: str, key: str) -> dict: ...
    def rollback(self, ns: str, key: str, version: int, *, if_version: int | None = None,
                 quota_bytes: int | None = None, quota_keys: int | None = None) -> dict: ...
    def usage(self, ns: str) -> dict: ...
    def usage_now(self, ns: str) -> dict:
        """``usage`` without waiting on a write in progress (the event loop calls it)."""
    def namespaces(self) -> list[str]: ...
    def group(self, jobs: list) -> list[tuple]:
        """Run ``jobs`` in one transaction, each undone alone if it fails, committed once (group commit)."""
    def expire_uploads(self) -> int: ...
    def close(self) -> None: ...


BACKENDS = ("sqlite",)  # [storage] backend


def open_storage(backend: str, path: str | os.PathLike, **options) -> Backend:
    """The storage ``backend`` (one of ``BACKENDS``) at ``path`` with ``Storage``'s keyword ``options``.
    Raises ``StorageUnavailable`` saying what failed; never a backend's own exception."""
    if backend != "sqlite":
        raise StorageUnavailable(f"[storage] backend {backend!r} is not built; known: {', '.join(BACKENDS)}")
    try:
        return Storage(path, **options)
    except (sqlite3.Error, OSError) as exc:
        raise StorageUnavailable(f"cannot open the storage database {path}: {exc}; check the state dir's "
                                 "permissions and free space") from None


class Storage:
    """The SQLite backend: one file of namespaces.  Quotas are passed per call (``quota_bytes``, ``quota_keys``: None =
    none), as they belong to the caller, not to the namespace."""

    def __init__(self, path: str | os.PathLike, *, max_value_bytes: int = 64 * MB, max_read: int = 512 << 10,
                 keep_versions: int = 16, keep_bytes: int = 64 * MB, upload_ttl_s: float = 3600.0,
                 clock=time.time):
        self.path = str(path)
        self.max_value_bytes, self.max_read = max_value_bytes, max_read
        self.keep_versions, self.keep_bytes, self.upload_ttl_s = keep_versions, keep_bytes, upload_ttl_s
        self._clock = clock
        self._lock = threading.RLock()  # the writer's connection (re-entered by the jobs of a group)
        self._in_group = False
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._rlock = threading.Lock()  # the readers' connection
        self._reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._expired_at = 0.0
        self._cached: dict[str, dict] = {}  # ns -> usage as of the last commit, read without the lock
        self.expire_uploads()

    def close(self) -> None:
        with self._lock, self._rlock:
            self._reader.close()
            self._db.close()

    # ---- the transaction ---------------------------------------------------------------------------------

    def _txn(self, fn, *args, **kw):
        """Run ``fn(db, ...)`` in one write transaction, committed (and fsynced) before returning; rolled back
        whole if it raises, so nothing is ever half-written.  Refreshes the usage the caller sees without the
        lock (``usage_now``)."""
        with self._lock:
            db = self._db
            begin, commit, undo = ("SAVEPOINT job", "RELEASE job", "ROLLBACK TO job") if self._in_group else \
                ("BEGIN IMMEDIATE", "COMMIT", "ROLLBACK")
            db.execute(begin)
            try:
                result = fn(db, *args, **kw)
            except BaseException:
                db.execute(undo)
                if self._in_group:
                    db.execute(commit)
                raise
            db.execute(commit)
            self._cached = {ns: {"bytes": b, "keys": k} for ns, b, k in db.execute("SELECT ns, bytes, keys FROM usage")} \
                if fn == self._expire else {**self._cached, **self._usage_of(db, args[0])}
            return result

    def group(self, jobs: list) -> list[tuple]:
        """Run ``jobs`` (callables making calls on this storage) in one transaction, each in a savepoint of its
        own (a failing job undoes only itself), and commit once: one fsync for the group (group commit).
        Returns ``[(result, error)]`` in order, after the commit; if the commit fails, raises (every job
        failed).  ``kernel/worker.py`` calls this with the writes queued at one moment."""
        out = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._in_group = True
            try:
                for job in jobs:
                    try:
                        out.append((job(), None))
                    except Exception as exc:
                        out.append((None, exc))
            except BaseException:
                self._in_group = False
                self._db.execute("ROLLBACK")
                raise
            self._in_group = False
            try:
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return out

    @staticmethod
    def _usage_of(db, ns) -> dict:
        row = db.execute("SELECT bytes, keys FROM usage WHERE ns = ?", (ns,)).fetchone() or (0, 0)
        return {ns: {"bytes": row[0], "keys": row[1]}}

    def usage_now(self, ns: str) -> dict:
        """``usage(ns)`` as of the last commit, without waiting for a transaction in progress (for the event
        loop: proc.self)."""
        return dict(self._cached.get(ns) or {"bytes": 0, "keys": 0})

    # ---- writes ------------------------------------------------------------------------------------------

    def put(self, ns: str, key: str, data: bytes | str, *, content_type: str | None = None,
            if_version: int | None = None, offset: int = 0, final: bool = True, quota_bytes: int | None = None,
            quota_keys: int | None = None) -> dict:
        """Write ``data`` as the new version of ``key`` (or, with ``final=False``, stage it as the part at
        ``offset`` of an upload).  Returns the version (or ``{"key", "staged"}``).  Raises ``StorageError``:
        EINVAL (key, offset, content type), E2BIG (over ``max_value_bytes``), ESTALE (``if_version``), EDQUOT."""
        check_key(key)
        if isinstance(data, str):
            data, content_type = data.encode("utf-8", "surrogatepass"), content_type or TEXT_TYPE
        content_type = content_type or BINARY_TYPE
        if len(content_type) > MAX_CONTENT_TYPE or any(unicodedata.category(c) == "Cc" for c in content_type):
            raise StorageError("EINVAL", f"content_type must be at most {MAX_CONTENT_TYPE} characters, no controls")
        if offset < 0:
            raise StorageError("EINVAL", "offset must be >= 0")
        self._maybe_expire()
        return self._txn(self._put, ns, key, bytes(data), content_type, if_version, offset, final, quota_bytes,
                         quota_keys)

    def _put(self, db, ns, key, data, content_type, if_version, offset, final, quota_bytes, quota_keys):
        staged = self._staged(db, ns, key)
        if offset == 0 and staged:  # starting over
            self._drop_parts(db, ns, key)
            staged = 0
        if offset == 0 and not final and not data:  # an abort: nothing staged any more
            return {"key": key, "staged": 0}
        if offset != staged:
            raise StorageError("EINVAL", f"offset must be {staged} (the bytes of {key!r} staged so far), or 0 "
                                         "to start the upload over")
        total = staged + len(data)
        if total > self.max_value_bytes:
            raise StorageError("E2BIG", f"a value is limited to {self.max_value_bytes} bytes ([storage] "
                                        f"max_value_mb); {key!r} would be {total}")
        if not final:
            before = self._usage(db, ns)
            self._add_usage(db, ns, len(data), 0)
            self._check_quota(db, ns, before, quota_bytes, quota_keys)
            db.execute("INSERT INTO parts VALUES (?, ?, ?, ?, ?, ?)", (ns, key, offset, data, content_type,
                                                                     self._clock()))
            return {"key": key, "staged": total}
        before = self._usage(db, ns)
        if staged:
            rows = db.execute("SELECT data FROM parts WHERE ns = ? AND key = ? ORDER BY offset", (ns, key))
            data = b"".join(r[0] for r in rows) + data
        row = self._key(db, ns, key)
        self._check_version(key, row, if_version)
        self._drop_parts(db, ns, key)
        return self._write(db, ns, key, row, data, content_type, False, quota_bytes, quota_keys, before)

    def delete(self, ns: str, key: str, *, if_version: int | None = None, purge: bool = False) -> dict:
        """Delete ``key``: a tombstone version (rollback can undo it), or with ``purge`` its whole history.
        ENOENT when it is missing (or, without ``purge``, already deleted); ESTALE per ``if_version``."""
        check_key(key)
        return self._txn(self._delete, ns, key, if_version, purge)

    def _delete(self, db, ns, key, if_version, purge):
        row = self._key(db, ns, key)
        if row is None or (row[1] and not purge):
            raise StorageError("ENOENT", f"no key {key!r} in namespace {ns!r}")
        self._check_version(key, row, if_version)
        if purge:
            size = db.execute("SELECT COALESCE(SUM(size), 0) FROM objects WHERE ns = ? AND key = ?",
                              (ns, key)).fetchone()[0]
            db.execute("DELETE FROM objects WHERE ns = ? AND key = ?", (ns, key))
            db.execute("DELETE FROM keys WHERE ns = ? AND key = ?", (ns, key))
            self._drop_parts(db, ns, key)
            self._add_usage(db, ns, -size, 0 if row[1] else -1)
            return {"key": key, "purged": True, "version": row[0]}
        return self._write(db, ns, key, row, b"", BINARY_TYPE, True, None, None, self._usage(db, ns))

    def rollback(self, ns: str, key: str, version: int, *, if_version: int | None = None,
                 quota_bytes: int | None = None, quota_keys: int | None = None) -> dict:
        """Make the content of ``version`` the newest version of ``key`` (a new version; history is kept).
        ENOENT when that version is not kept; EINVAL when it is a deletion (use ``delete``)."""
        check_key(key)
        return self._txn(self._rollback, ns, key, version, if_version, quota_bytes, quota_keys)

    def _rollback(self, db, ns, key, version, if_version, quota_bytes, quota_keys):
        src = db.execute("SELECT id, deleted, content_type FROM objects WHERE ns = ? AND key = ? AND version = ?",
                         (ns, key, version)).fetchone()
        if src is None:
            raise StorageError("ENOENT", f"{key!r} has no version {version} kept (storage.versions lists them)")
        if src[1]:
            raise StorageError("EINVAL", f"version {version} of {key!r} is a deletion; use storage.delete")
        row = self._key(db, ns, key)
        self._check_version(key, row, if_version)
        data = db.execute("SELECT data FROM objects WHERE id = ?", (src[0],)).fetchone()[0]
        return self._write(db, ns, key, row, bytes(data), src[2], False, quota_bytes, quota_keys,
                           self._usage(db, ns))

    # ---- reads -------------------------------------------------------------------------------------------

    def get(self, ns: str, key: str, *, version: int | None = None, offset: int = 0,
            length: int | None = None) -> dict:
        """Up to ``min(length, max_read)`` bytes of ``key`` (its newest version, or ``version``) from
        ``offset``: the version's fields plus ``data``, ``offset`` and ``eof``.  ENOENT for a missing or deleted
        key or version; EINVAL for an offset past the end."""
        check_key(key)
        with self._rlock:
            db = self._reader
            if version is None:
                row = self._key(db, ns, key)
                if row is None or row[1]:
                    raise StorageError("ENOENT", f"no key {key!r} in namespace {ns!r}")
                version = row[0]
            obj = db.execute("SELECT id, version, size, sha256, content_type, mtime, deleted FROM objects "
                             "WHERE ns = ? AND key = ? AND version = ?", (ns, key, version)).fetchone()
            if obj is None or obj[6]:
                raise StorageError("ENOENT", f"{key!r} has no version {version} with content")
            size = obj[2]
            if not 0 <= offset <= size:
                raise StorageError("EINVAL", f"offset {offset} is past the end of {key!r} ({size} bytes)")
            n = min(size - offset, self.max_read if length is None else min(max(0, length), self.max_read))
            data = b""
            if n:
                with db.blobopen("objects", "data", obj[0], readonly=True) as blob:
                    blob.seek(offset)
                    data = blob.read(n)
            result = _version(obj[1:])
            result.update(key=key, data=data, offset=offset, eof=offset + n >= size)
            return result

    def stat(self, ns: str, key: str) -> dict:
        """The newest version of ``key`` with ``key`` and ``versions`` (how many are kept); ENOENT if it is
        missing or deleted."""
        check_key(key)
        with self._rlock:
            row = self._key(self._reader, ns, key)
            if row is None or row[1]:
                raise StorageError("ENOENT", f"no key {key!r} in namespace {ns!r}")
            obj = self._reader.execute("SELECT version, size, sha256, content_type, mtime, deleted FROM objects "
                                   "WHERE ns = ? AND key = ? AND version = ?", (ns, key, row[0])).fetchone()
            count = self._reader.execute("SELECT COUNT(*) FROM objects WHERE ns = ? AND key = ?", (ns, key)).fetchone()
            return dict(_version(obj), key=key, versions=count[0])

    def exists(self, ns: str, key: str) -> bool:
        """Whether ``key`` has a live (not deleted) version in ``ns``."""
        with self._rlock:
            row = self._key(self._reader, ns, key)
        return row is not None and not row[1]

    def list(self, ns: str, prefix: str = "", *, after: str = "", limit: int = 100) -> dict:
        """Live keys of ``ns`` that start with ``prefix`` and sort after ``after``, in key order, at most
        ``limit``: ``{"entries": [version + key], "more": bool}``."""
        with self._rlock:
            rows = self._reader.execute(
                "SELECT k.key, o.version, o.size, o.sha256, o.content_type, o.mtime, o.deleted FROM keys k "
                "JOIN objects o ON o.ns = k.ns AND o.key = k.key AND o.version = k.latest "
                "WHERE k.ns = ? AND k.deleted = 0 AND k.key >= ? AND k.key > ? AND substr(k.key, 1, ?) = ? "
                "ORDER BY k.key LIMIT ?", (ns, prefix, after, len(prefix), prefix, limit + 1)).fetchall()
        entries = [dict(_version(r[1:]), key=r[0]) for r in rows[:limit]]
        return {"entries": entries, "more": len(rows) > limit}

    def versions(self, ns: str, key: str) -> dict:
        """Every kept version of ``key``, newest first, tombstones included; ENOENT if it has none."""
        check_key(key)
        with self._rlock:
            rows = self._reader.execute("SELECT version, size, sha256, content_type, mtime, deleted FROM objects "
                                    "WHERE ns = ? AND key = ? ORDER BY version DESC", (ns, key)).fetchall()
        if not rows:
            raise StorageError("ENOENT", f"no key {key!r} in namespace {ns!r}")
        return {"key": key, "versions": [_version(r) for r in rows]}

    def usage(self, ns: str) -> dict:
        """What the quotas count for ``ns``: ``{"bytes": kept versions + staged parts, "keys": live keys}``."""
        with self._rlock:
            row = self._reader.execute("SELECT bytes, keys FROM usage WHERE ns = ?", (ns,)).fetchone()
        return {"bytes": row[0], "keys": row[1]} if row else {"bytes": 0, "keys": 0}

    def namespaces(self) -> list[str]:
        """Every namespace that holds something (for operators)."""
        with self._rlock:
            return [r[0] for r in self._reader.execute("SELECT ns FROM usage WHERE bytes > 0 OR keys > 0 ORDER BY ns")]

    # ---- uploads -----------------------------------------------------------------------------------------

    def expire_uploads(self) -> int:
        """Discard uploads idle for ``upload_ttl_s``; how many parts went."""
        self._expired_at = time.monotonic()
        return self._txn(self._expire, self._clock() - self.upload_ttl_s)

    def _expire(self, db, before: float) -> int:
        rows = db.execute("SELECT ns, key, SUM(length(data)) FROM parts GROUP BY ns, key HAVING MAX(updated) < ?",
                          (before,)).fetchall()
        for ns, key, size in rows:
            self._drop_parts(db, ns, key)
        return len(rows)

    def _maybe_expire(self) -> None:
        if time.monotonic() - self._expired_at > EXPIRE_EVERY_S:
            self.expire_uploads()

    # ---- internals (inside a transaction) -----------------------------------------------------------------

    @staticmethod
    def _key(db, ns, key):
        return db.execute("SELECT latest, deleted FROM keys WHERE ns = ? AND key = ?", (ns, key)).fetchone()

    @staticmethod
    def _staged(db, ns, key) -> int:
        return db.execute("SELECT COALESCE(SUM(length(data)), 0) FROM parts WHERE ns = ? AND key = ?",
                          (ns, key)).fetchone()[0]

    def _drop_parts(self, db, ns, key) -> None:
        staged = self._staged(db, ns, key)
        if staged:
            db.execute("DELETE FROM parts WHERE ns = ? AND key = ?", (ns, key))
            self._add_usage(db, ns, -staged, 0)

    @staticmethod
    def _check_version(key, row, if_version) -> None:
        if if_version is None:
            return
        live = row[0] if row is not None and not row[1] else 0
        if live != if_version:
            state = f"at version {live}" if live else "absent or deleted"
            raise StorageError("ESTALE", f"key {key!r} is {state}, not {if_version}: read it again and retry")

    def _write(self, db, ns, key, row, data, content_type, deleted, quota_bytes, quota_keys, before) -> dict:
        """Insert the next version of ``key``, update ``keys`` and usage, prune old versions, check the quotas
        against ``before`` (the usage when the transaction began)."""
        new_key = row is None or bool(row[1])
        self._add_usage(db, ns, len(data), -1 if deleted else (1 if new_key else 0))
        version = (row[0] if row else 0) + 1
        now = self._clock()
        digest = hashlib.sha256(data).hexdigest()
        db.execute("INSERT INTO objects(ns, key, version, size, sha256, content_type, mtime, deleted, data) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (ns, key, version, len(data), digest, content_type, now, int(deleted), data))
        db.execute("INSERT INTO keys VALUES (?, ?, ?, ?) ON CONFLICT(ns, key) DO UPDATE SET latest = excluded.latest, "
                   "deleted = excluded.deleted", (ns, key, version, int(deleted)))
        self._prune(db, ns, key)
        self._check_quota(db, ns, before, quota_bytes, quota_keys)
        return {"key": key, "version": version, "size": len(data), "sha256": digest, "content_type": content_type,
                "mtime": now, "deleted": deleted}

    def _prune(self, db, ns, key) -> None:
        """Keep versions newest first while at most ``keep_versions`` of them total at most ``keep_bytes``; the
        newest always stays."""
        rows = db.execute("SELECT id, size FROM objects WHERE ns = ? AND key = ? ORDER BY version DESC",
                          (ns, key)).fetchall()
        total, drop = 0, []
        for i, (oid, size) in enumerate(rows):
            total += size
            if i > 0 and (i >= self.keep_versions or total > self.keep_bytes):
                drop.append((oid, size))
        if drop:
            db.executemany("DELETE FROM objects WHERE id = ?", [(oid,) for oid, _ in drop])
            self._add_usage(db, ns, -sum(size for _, size in drop), 0)

    def _check_quota(self, db, ns, before: tuple, quota_bytes, quota_keys) -> None:
        """EDQUOT (the caller's transaction is rolled back: nothing written) if this transaction took ``ns``
        past a quota.  Counted after pruning, so a key can be rewritten at the quota when the old versions the
        write prunes make room; a write that does not grow the usage is never refused."""
        use = db.execute("SELECT bytes, keys FROM usage WHERE ns = ?", (ns,)).fetchone() or (0, 0)
        if quota_bytes is not None and use[0] > max(before[0], quota_bytes):
            raise StorageError("EDQUOT", f"namespace {ns!r} would hold {use[0]} bytes, over its storage_mb quota "
                                         f"({quota_bytes} bytes): delete keys with purge, or ask the operator for "
                                         "a larger quota")
        if quota_keys is not None and use[1] > max(before[1], quota_keys):
            raise StorageError("EDQUOT", f"namespace {ns!r} would have {use[1]} keys, over its storage_keys quota "
                                         f"({quota_keys}): delete some first")

    @staticmethod
    def _usage(db, ns) -> tuple:
        return db.execute("SELECT bytes, keys FROM usage WHERE ns = ?", (ns,)).fetchone() or (0, 0)

    @staticmethod
    def _add_usage(db, ns, add_bytes, add_keys) -> None:
        db.execute("INSERT INTO usage VALUES (?, ?, ?) ON CONFLICT(ns) DO UPDATE SET bytes = bytes + excluded.bytes, "
                   "keys = keys + excluded.keys", (ns, add_bytes, add_keys))


def _version(row) -> dict:
    """(version, size, sha256, content_type, mtime, deleted) as the ABI's version map."""
    return {"version": row[0], "size": row[1], "sha256": row[2], "content_type": row[3], "mtime": row[4],
            "deleted": bool(row[5])}
