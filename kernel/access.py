"""The access manager: sharing only by grant, confirmation of destructive operations, and a tamper-evident audit
log (docs/abi.md, "Access"; docs/access.md).

**Grants.**  The owner of a namespace (the agent of that launch name, or an operator) grants ``read`` or
``read-write`` on the namespace -- or on a key prefix of its storage -- to another agent name or to a privilege
group (``group:NAME``), and revokes it.  ``check`` answers, for a caller acting on a namespace that is not its
own, whether some grant covers the operation; nothing else opens another agent's data (fail closed: no grant,
no access).  Memory entries have no keys: only a grant on the whole namespace (prefix ``""``) covers them.
Grants live in a SQLite file in the state dir (WAL, ``synchronous=FULL``), so they survive restarts; there are
few of them and they are read on the event loop from an in-memory copy.

**Confirmation.**  By policy (``[access] confirm``), some operations wait for an operator: ``delete`` (storage
deletes and memory deletes), ``overwrite`` (a write to a key that already has a version), ``cross_write`` (any
write into another agent's namespace).  ``Pending`` holds each waiting call with who, what and why until
``decide`` (``aiosctl approve|deny ID``) or the timeout (``EACCES``).

**Audit log.**  ``Audit`` appends one JSON line per access decision across namespaces, grant, revoke,
confirmation request and decision to ``<state-dir>/audit.log``.  Each record carries the SHA-256 of the previous
record's line and its own (``verify`` recomputes the chain, so an edited, inserted or deleted line is detected).
Lines are written with ``O_APPEND`` at once and fsynced at most once a second (``flush``); a write error (a full
disk) drops the record, counts it and says so once in the kernel log, never stopping the kernel.  One principal
gets at most ``PER_WHO_PER_S`` records a second (the rest are counted into its next record), so an agent that
floods refused calls spends its own syscall rate, not the kernel's disk.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field

from syscalls.errors import EINVAL, ENOENT

log = logging.getLogger("aiosd.access")

MODES = ("read", "read-write")
CONFIRMABLE = ("delete", "overwrite", "cross_write")
GROUP_PREFIX = "group:"
GENESIS = "0" * 64
MAX_GRANTS_PER_OWNER = 256
PER_WHO_PER_S = 20  # audit records a second for one principal; the rest are counted into its next record

SCHEMA = """
CREATE TABLE IF NOT EXISTS grants(
    id INTEGER PRIMARY KEY, owner TEXT NOT NULL, prefix TEXT NOT NULL, grantee TEXT NOT NULL,
    mode TEXT NOT NULL, created REAL NOT NULL, by TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Grant:
    id: int
    owner: str      # the namespace
    prefix: str     # storage keys starting with this ("" = the whole namespace, memory included)
    grantee: str    # an agent name, or "group:NAME"
    mode: str       # read | read-write
    created: float
    by: str         # who granted it (for the audit)

    def record(self) -> dict:
        return {"id": self.id, "namespace": self.owner, "prefix": self.prefix, "to": self.grantee,
                "mode": self.mode, "created": self.created, "by": self.by}

    def covers(self, name: str, group: str, key: str | None, write: bool) -> bool:
        """Does this grant let agent ``name`` of ``group`` do this?  ``key``: the storage key or list prefix
        acted on (None: the whole namespace, as memory calls and namespace-wide listings are)."""
        if self.grantee != name and self.grantee != GROUP_PREFIX + group:
            return False
        if write and self.mode != "read-write":
            return False
        if self.prefix == "":
            return True
        return key is not None and key.startswith(self.prefix)


class Grants:
    """The grants of every namespace, in a SQLite file, mirrored in memory."""

    def __init__(self, path: str | os.PathLike):
        self._db = sqlite3.connect(os.fspath(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._all = {row[0]: Grant(*row) for row in self._db.execute(
            "SELECT id, owner, prefix, grantee, mode, created, by FROM grants")}

    def close(self) -> None:
        self._db.close()

    def add(self, owner: str, prefix: str, grantee: str, mode: str, by: str) -> Grant:
        """A new grant (committed before it returns).  EINVAL for a bad mode, grantee or prefix."""
        if mode not in MODES:
            raise EINVAL(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not grantee or (grantee.startswith(GROUP_PREFIX) and len(grantee) == len(GROUP_PREFIX)):
            raise EINVAL("to must name an agent (its launch name) or a group as 'group:NAME'")
        if grantee == owner:
            raise EINVAL("a namespace's own agents need no grant")
        if prefix:
            from kernel.storage import check_key
            check_key(prefix.rstrip("/") or prefix)  # a prefix is (the start of) a valid key
        if sum(g.owner == owner for g in self._all.values()) >= MAX_GRANTS_PER_OWNER:
            raise EINVAL(f"namespace {owner!r} has {MAX_GRANTS_PER_OWNER} grants; revoke some first")
        now = time.time()
        cur = self._db.execute("INSERT INTO grants(owner, prefix, grantee, mode, created, by) VALUES (?, ?, ?, ?, ?, ?)",
                               (owner, prefix, grantee, mode, now, by))
        grant = Grant(cur.lastrowid, owner, prefix, grantee, mode, now, by)
        self._all[grant.id] = grant
        return grant

    def remove(self, grant_id: int, owner: str | None) -> Grant:
        """Revoke grant ``grant_id`` of namespace ``owner`` (None: any, for operators).  ENOENT if there is no
        such grant of that namespace (another namespace's grant looks the same as none)."""
        grant = self._all.get(grant_id)
        if grant is None or (owner is not None and grant.owner != owner):
            raise ENOENT(f"no grant {grant_id} on your namespace (access.list shows them)")
        self._db.execute("DELETE FROM grants WHERE id = ?", (grant_id,))
        del self._all[grant_id]
        return grant

    def of(self, owner: str | None = None, grantee: str | None = None, group: str | None = None) -> list[Grant]:
        """Grants on ``owner``'s namespace, or to ``grantee`` (directly or through ``group``)."""
        out = []
        targets = {grantee, GROUP_PREFIX + group if group else None} - {None}
        for g in sorted(self._all.values(), key=lambda g: g.id):
            if (owner is not None and g.owner == owner) or g.grantee in targets:
                out.append(g)
        return out

    def allowed(self, name: str, group: str, owner: str, key: str | None, write: bool) -> Grant | None:
        """The grant that lets ``name`` (of ``group``) act on ``owner``'s namespace, or None."""
        for g in self._all.values():
            if g.owner == owner and g.covers(name, group, key, write):
                return g
        return None


class Audit:
    """The append-only, hash-chained audit log (one JSON object a line)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.dropped = 0
        self._rate: dict[str, tuple[float, int, int]] = {}  # who -> (window start, records in it, suppressed)
        self._dirty = False
        self._last_sync = 0.0
        self._seq, self._prev = self._tail()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _tail(self) -> tuple[int, str]:
        """(seq, hash) of the last complete record (a line cut by a crash is ignored, and its successor chains
        from the last whole one)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 65536))
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            return 0, GENESIS
        for line in reversed(lines):
            try:
                rec = json.loads(line)
                return int(rec["seq"]), rec["hash"]
            except (ValueError, KeyError, TypeError):
                continue
        return 0, GENESIS

    def append(self, who: str, what: str, decision: str, **detail) -> None:
        """One record: who did what, what was decided, when, and details.  Never raises.  At most
        ``PER_WHO_PER_S`` records a second for one ``who``: past that they are counted, and the next record
        of that ``who`` carries the count (``suppressed``), so a flood of refused calls cannot fill the disk."""
        now = time.monotonic()
        window, count, suppressed = self._rate.get(who, (now, 0, 0))
        if now - window >= 1.0:
            window, count = now, 0
        if count >= PER_WHO_PER_S:
            self._rate[who] = (window, count, suppressed + 1)
            return
        self._rate[who] = (window, count + 1, 0)
        if len(self._rate) > 4096:  # forget the quietest: their windows have long passed
            for key in [k for k, (w, _, s) in self._rate.items() if now - w > 1.0 and not s][:2048]:
                del self._rate[key]
        if suppressed:
            detail["suppressed"] = suppressed
        self._seq += 1
        rec = {"seq": self._seq, "time": round(time.time(), 6), "who": who, "what": what, "decision": decision,
               "detail": detail, "prev": self._prev}
        rec["hash"] = record_hash(rec)
        line = (json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n").encode()
        try:
            os.write(self._fd, line)
        except OSError as exc:
            self._seq -= 1
            self.dropped += 1
            if self.dropped == 1:
                log.warning("audit: cannot append to %s (%s); records are dropped and counted until it can",
                            self.path, exc.strerror or exc)
            return
        self._prev = rec["hash"]
        self._dirty = True

    def flush(self) -> None:
        """Write the counts of records suppressed in windows that have ended, and fsync what was appended since
        the last flush (the kernel calls it every quarter second; the fsync happens at most once a second)."""
        now = time.monotonic()
        for who, (window, _, suppressed) in list(self._rate.items()):
            if suppressed and now - window >= 1.0:
                self._rate[who] = (now, 0, 0)
                self.append(who, "audit", "suppressed", count=suppressed)
        if self._dirty and now - self._last_sync >= 1.0:
            self._last_sync = now
            self._dirty = False
            try:
                os.fsync(self._fd)
            except OSError:
                pass

    def close(self) -> None:
        self.flush()
        os.close(self._fd)


def record_hash(rec: dict) -> str:
    """The SHA-256 of a record without its ``hash`` field, in canonical JSON."""
    body = {k: v for k, v in rec.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify(lines) -> tuple[int, str | None]:
    """Check an audit log's chain: ``(records checked, None)`` when whole, else ``(records, what is wrong)``
    naming the first bad record (edited, inserted, deleted or reordered)."""
    prev, seq, n = GENESIS, 0, 0
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            return n, f"line {i} is not JSON"
        if rec.get("prev") != prev:
            return n, f"line {i} (seq {rec.get('seq')}) does not follow the record before it: one was removed, " \
                      "inserted or edited"
        if record_hash(rec) != rec.get("hash"):
            return n, f"line {i} (seq {rec.get('seq')}) was edited: its hash does not match its content"
        if rec.get("seq") != seq + 1:
            return n, f"line {i} has seq {rec.get('seq')} where {seq + 1} was due"
        prev, seq, n = rec["hash"], rec["seq"], n + 1
    return n, None


@dataclass
class Waiting:
    """A call waiting for an operator's decision."""
    id: int
    who: str
    what: str
    why: str
    created: float
    deadline: float
    run: object = field(repr=False)      # () -> None: carry the call out (approved)
    fail: object = field(repr=False)     # (code, message) -> None: answer it with an error (denied, timed out)
    owner: int | None = None             # the waiting agent's id (its ending drops the request)

    def record(self) -> dict:
        return {"id": self.id, "who": self.who, "what": self.what, "why": self.why, "created": self.created,
                "expires_in": round(max(0.0, self.deadline - time.time()), 1)}


class Pending:
    """Calls waiting for confirmation, by id."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._ids = itertools.count(1)
        self.waiting: dict[int, Waiting] = {}

    def add(self, who: str, what: str, why: str, run, fail, owner: int | None) -> Waiting:
        now = time.time()
        w = Waiting(next(self._ids), who, what, why, now, now + self.timeout_s, run, fail, owner)
        self.waiting[w.id] = w
        return w

    def take(self, wait_id: int) -> Waiting:
        w = self.waiting.pop(wait_id, None)
        if w is None:
            raise ENOENT(f"no request {wait_id} is waiting (`aiosctl pending` lists them)")
        return w

    def expired(self) -> list[Waiting]:
        now = time.time()
        gone = [w for w in self.waiting.values() if w.deadline <= now]
        for w in gone:
            del self.waiting[w.id]
        return gone

    def of_owner(self, owner: int) -> list[Waiting]:
        gone = [w for w in self.waiting.values() if w.owner == owner]
        for w in gone:
            del self.waiting[w.id]
        return gone

