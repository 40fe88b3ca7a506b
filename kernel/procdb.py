"""The process table on disk: ``<state-dir>/procs.db``, so that records outlive the kernel (docs/abi.md,
process record; docs/operating.md, "Restarts").

One SQLite file in WAL mode.  Every change the kernel makes to a record (spawn, first syscall, end, a relaunch
scheduled, usage) is one committed transaction; ``synchronous=NORMAL`` makes a commit durable against the death
of the kernel process (``kill -9`` mid-write loses nothing already committed: WAL appends, and an incomplete
last frame is ignored when the file is next opened) -- a power cut may lose the last moments of records, never
corrupt the file.  Storage, whose writes agents are told are done, fsyncs every commit (kernel/storage.py);
records do not need it.

A kernel holds ``procs.lock`` in the state dir for its whole life (``flock``; released by the OS however the
kernel ends), so two kernels never share one table: a second one on the same state dir refuses to start.

Rows: ``procs(id, record, spec)`` -- ``record`` the JSON process record plus the kernel's private keys
(``_``-prefixed), ``spec`` what a relaunch needs (msgpack: source, filename, name, group, argv, limits, fleet,
restart, owner; only for processes with a restart policy); ``meta(key, value)`` -- ``next_id`` (ids are never
reused) and ``kernel_pid`` (the kernel that last used the table).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
from pathlib import Path

import msgspec

KEEP_RECORDS = 1000  # records kept across restarts, newest first (live and waiting ones always): proc.list
# answers with every record in one frame, and 1,000 records stay within the default max_frame

_SCHEMA = """
CREATE TABLE IF NOT EXISTS procs (id INTEGER PRIMARY KEY, record TEXT NOT NULL, spec BLOB);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class ProcDBError(Exception):
    """The table cannot be opened; the message says what to do."""


class ProcDB:
    """The persistent process table of one kernel (the only writer).  Not thread-safe: the event loop uses it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = None
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock = open(self.path.with_name("procs.lock"), "a+")
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise ProcDBError(f"another kernel uses the state dir {self.path.parent} (it holds "
                              f"{self.path.with_name('procs.lock')}); give each kernel its own --state-dir") from None
        except OSError as exc:
            if self._lock is not None:
                self._lock.close()
            raise ProcDBError(f"cannot lock {self.path.with_name('procs.lock')}: {exc.strerror or exc}") from None
        try:
            self._db = sqlite3.connect(os.fspath(self.path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            self._lock.close()
            raise ProcDBError(f"cannot open the process table {self.path}: {exc}; check the state dir's "
                              "permissions and free space (or move a damaged file aside)") from None

    def load(self, keep: int = KEEP_RECORDS) -> tuple[list[tuple[dict, dict | None]], dict]:
        """Every kept record, oldest first, as (record, spec); and the meta table.  Prunes ended records
        beyond the newest ``keep`` first."""
        with self._tx():
            self._db.execute(
                "DELETE FROM procs WHERE id NOT IN (SELECT id FROM procs ORDER BY id DESC LIMIT ?) "
                "AND json_extract(record, '$.state') NOT IN ('STARTING', 'RUNNING') "
                "AND json_extract(record, '$.restart_at') IS NULL", (keep,))
        rows = []
        for record, spec in self._db.execute("SELECT record, spec FROM procs ORDER BY id"):
            rows.append((json.loads(record), msgspec.msgpack.decode(spec) if spec is not None else None))
        meta = dict(self._db.execute("SELECT key, value FROM meta"))
        return rows, meta

    def save(self, records: list[dict], specs: dict[int, dict] | None = None, meta: dict | None = None) -> None:
        """Write ``records`` (new or changed), the ``specs`` of new ones (by id) and ``meta`` in one transaction."""
        specs = specs or {}
        with self._tx():
            for rec in records:
                spec = specs.get(rec["id"])
                self._db.execute(
                    "INSERT INTO procs (id, record, spec) VALUES (?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET record = excluded.record",
                    (rec["id"], json.dumps(rec), msgspec.msgpack.encode(spec) if spec is not None else None))
            for key, value in (meta or {}).items():
                self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, str(value)))

    @contextlib.contextmanager
    def _tx(self):
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        try:
            self._db.close()
        finally:
            if self._lock is not None:
                self._lock.close()
                self._lock = None
