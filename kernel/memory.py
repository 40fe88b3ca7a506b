"""The memory manager: each agent's long-term memory -- text entries with metadata, searched by meaning and by
keyword (the AIOS paper's memory manager).  Design and measurements: docs/memory.md.

An entry lives in a **namespace** (the agent's launch name) and has an id that is unique across namespaces and
never reused; asking another namespace for it is ``ENOENT``, exactly as if it did not exist.  Calls come from
the kernel's worker threads (never its event loop) and are thread-safe.

Three places hold an entry::

    SQLite (the file)   every entry, always: text, metadata, vector; write-through (WAL, synchronous=FULL:
                        add/delete return after the commit is fsynced); FTS5 index per namespace (BM25)
    RAM vectors         every entry's vector, per namespace, a float32 matrix (rows normalised): searched
                        exactly, ``matrix @ query``, for the semantic score
    RAM residency       texts + metadata of recently used entries, within ``ram_budget_bytes`` (all
                        namespaces together); the rest is *evicted* and paged back in from SQLite on access

**Eviction is LRU-K with K=2** (O'Neil et al., 1993): each access (``add``, ``get``, being a ``search`` hit)
is timed with ``clock``.  When resident bytes pass ``evict_threshold * budget``, the entries whose second most
recent access is oldest are evicted until resident bytes are at most ``evict_target * budget`` (0.8 and 0.7 by
default: the gap keeps one page-in from evicting one entry at a time).  An entry accessed once ranks as
-infinity (goes first), oldest last access first among those -- so a burst of new entries, or one scan, cannot
push out what is used again and again.  The access history of evicted entries is retained (for as many entries
as are resident, at least 1024), so an entry paged back in keeps its rank.  Victims come from a heap keyed by
(second most recent access, last access, access number) with lazy invalidation: every access pushes a fresh
key, stale keys are skipped when popped, and the heap is rebuilt when it holds twice the resident entries --
O(log n) per access and per eviction.  ``list`` reads SQLite directly and neither counts as an access nor
pages in.  An entry's resident cost is its ``size`` (UTF-8 bytes of text plus of its metadata as JSON) plus
``ENTRY_OVERHEAD`` bytes; vectors (1 KiB each at 256-d) are outside the budget (``stats`` reports them).

**Search** has three modes: ``embedding`` (cosine of the query's vector with every entry's, exact:
``matrix @ query`` and ``np.argpartition``), ``keyword`` (FTS5 BM25 over the query's words but stopwords,
ORed, Porter-stemmed; the rarest words first, up to ``KEYWORD_POSTINGS`` matching entries, so common words
cannot make it slow), and ``hybrid`` (default): the best ``CANDIDATES`` of each, scored ``alpha * cosine +
(1 - alpha) * bm25`` with both min-max normalised over the candidates, ``alpha`` 0.7 -- chosen over reciprocal
rank fusion and other weights by recall and MRR on bench/memory_eval.json (docs/memory.md).  ``filter`` is
exact match on metadata keys (all given keys must match; numbers match numerically, ``True`` only ``True``),
served by an index of (namespace, key, value): the best entries by cosine are checked against it (a few
hundred ids), and a filter too selective for that is resolved first.  The matrix product is memory-bound
(~7 ms per 100k entries); OpenBLAS's threads only add scheduling delay on a busy machine, so run the kernel
with ``OPENBLAS_NUM_THREADS=1`` (docs/memory.md has the figures).

Limits (``EINVAL`` naming the rule, ``E2BIG`` for text over the maximum): see ``MAX_*`` below.  Quotas are
the caller's (the kernel passes the agent's): ``EDQUOT``, with nothing written.  ``created_at`` is wall-clock
unix time; ``clock`` (monotonic, injectable for tests) only orders accesses.
"""
from __future__ import annotations

import heapq
import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
from collections import OrderedDict

import numpy as np

from kernel.embed import Embedder, normalise
from syscalls.errors import SyscallError

log = logging.getLogger(__name__)

MAX_NAMESPACE = 256       # chars
MAX_TEXT = 65536          # chars (E2BIG beyond)
MAX_META_KEYS = 32
MAX_META_KEY = 64         # chars
MAX_META_STR = 1024       # chars
MAX_QUERY = 4096          # chars
MAX_K = 100
MAX_LIMIT = 1000
LIST_TEXT_CHARS = 200     # list() returns at most this much of each text
ENTRY_OVERHEAD = 256      # bytes a resident entry costs beyond its size (objects, dict slot, heap key)
CANDIDATES = 50           # per ranking, fused in hybrid mode
RRF_K = 60                # reciprocal rank fusion constant (Cormack et al., 2009)
MAX_QUERY_TERMS = 24      # distinct words of a query used for its keyword score, at most
KEYWORD_POSTINGS = 5000   # entries BM25 scores per query, about: rarest words first (the rarest always)
FILTER_PROBE = 4096       # a filtered search checks up to this many of the best entries before filtering first
EMBED_BATCH = 1024        # texts per embedder call when (re-)embedding in bulk
RETAINED_MIN = 1024       # evicted entries whose access history is kept, at least
MODES = ("embedding", "keyword", "hybrid")
FUSIONS = ("rrf", "linear")
_INT64 = (-(1 << 63), (1 << 63) - 1)
_WORD = re.compile(r"\w+")
# Words left out of a query's keyword score: they match most entries and only add noise to the fused ranking.
STOPWORDS = frozenset("""a about above after again all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has have having
he her here hers him his how i if in into is it its itself just me more most my no nor not now of off on once
only or other our ours out over own same she should so some such than that the their theirs them then there
these they this those through to too under until up very was we were what when where which while who whom why
will with would you your yours""".split())

_SCHEMA = """
CREATE TABLE IF NOT EXISTS config(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS namespaces(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS entries(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ns_id INTEGER NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at REAL NOT NULL,
    size INTEGER NOT NULL,
    vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS entries_by_ns ON entries(ns_id, id);
CREATE TABLE IF NOT EXISTS entry_meta(
    ns_id INTEGER NOT NULL, key TEXT NOT NULL, kind TEXT NOT NULL, value, entry_id INTEGER NOT NULL,
    PRIMARY KEY (ns_id, key, kind, value, entry_id)) WITHOUT ROWID;
"""


class MemoryError(SyscallError):  # noqa: A001 -- the ABI's name; shadows the builtin inside this module only
    """An ABI error (docs/abi.md section 3): ``.code`` is ``"EINVAL"``, ``"E2BIG"``, ``"ENOENT"``, ``"EDQUOT"``
    or ``"EIO"``; ``.message`` says what to do.  A ``SyscallError``, so the router replies with it as is."""

    def __init__(self, code: str, message: str):
        super().__init__(message, code)

    def __repr__(self) -> str:
        return f"MemoryError({self.code!r}, {self.message!r})"


# ---------------------------------------------------------------------------------------------- validation

def _einval(message: str) -> MemoryError:
    return MemoryError("EINVAL", message)


def _check_int(name: str, value, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _einval(f"{name} must be an integer, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise _einval(f"{name} must be in {lo}..{hi}, got {value}")
    return value


def _check_str(name: str, value, hi: int, lo: int = 1) -> str:
    """``value`` as a str of ``lo..hi`` chars, no NUL, encodable as UTF-8; EINVAL naming ``name`` otherwise."""
    if not isinstance(value, str):
        raise _einval(f"{name} must be a string, not {type(value).__name__}")
    if not lo <= len(value) <= hi:
        raise _einval(f"{name} must be {lo}..{hi} characters, got {len(value)}")
    if "\x00" in value:
        raise _einval(f"{name} must not contain NUL characters")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise _einval(f"{name} must be valid Unicode (it has a lone surrogate)") from None
    return value


def _check_namespace(ns) -> str:
    return _check_str("namespace", ns, MAX_NAMESPACE)


def _check_text(text) -> str:
    if isinstance(text, str) and len(text) > MAX_TEXT:
        raise MemoryError("E2BIG", f"text is {len(text)} characters, over the maximum of {MAX_TEXT}; "
                                   "split it into several entries")
    return _check_str("text", text, MAX_TEXT)


def _check_metadata(metadata, name: str = "metadata") -> dict:
    """``metadata`` (None = ``{}``) checked against the rules: at most 32 keys of 1..64 chars; values str of
    at most 1024 chars, int (64-bit), finite float or bool.  Returns a copy."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise _einval(f"{name} must be a map of string keys to str/int/float/bool, not {type(metadata).__name__}")
    if len(metadata) > MAX_META_KEYS:
        raise _einval(f"{name} has {len(metadata)} keys, over the maximum of {MAX_META_KEYS}")
    out = {}
    for key, value in metadata.items():
        _check_str(f"{name} key", key, MAX_META_KEY)
        where = f"{name}[{key!r}]"
        if isinstance(value, str):
            _check_str(where, value, MAX_META_STR, lo=0)
        elif isinstance(value, bool):
            pass
        elif isinstance(value, int):
            _check_int(where, value, *_INT64)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise _einval(f"{where} must be a finite number, got {value}")
        else:
            raise _einval(f"{where} must be str, int, float or bool, not {type(value).__name__}")
        out[key] = value
    return out


def _check_entry_id(entry_id) -> int:
    if not isinstance(entry_id, int) or isinstance(entry_id, bool):
        raise _einval(f"entry id must be an integer, not {type(entry_id).__name__}")
    return entry_id


def _meta_kind(value) -> tuple[str, object]:
    """How a metadata value is indexed: (kind, value) -- bools apart from numbers, so 1 never matches True."""
    if isinstance(value, bool):
        return "bool", int(value)
    if isinstance(value, (int, float)):
        return "num", value
    return "str", value


def _query_words(query: str) -> list[str]:
    """The distinct words of ``query`` but ``STOPWORDS``, lower-cased, at most ``MAX_QUERY_TERMS``; each is
    FTS5-safe inside double quotes (``\\w`` characters only)."""
    words = [w for w in dict.fromkeys(w.lower() for w in _WORD.findall(query)) if w not in STOPWORDS]
    return words[:MAX_QUERY_TERMS]


# ---------------------------------------------------------------------------------------------- ranking

def fuse_rrf(rankings: list[list[int]]) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: each id scores the sum over ``rankings`` (best first) of ``1/(RRF_K + rank)``,
    rank from 1.  Returns (id, score) best first."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, entry_id in enumerate(ranking, 1):
            scores[entry_id] = scores.get(entry_id, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(scores.items(), key=lambda item: -item[1])


def fuse_linear(semantic: dict[int, float], keyword: dict[int, float], alpha: float) -> list[tuple[int, float]]:
    """``alpha * semantic + (1 - alpha) * keyword``, each min-max normalised to 0..1 over its candidates (an id
    missing from one scores 0 there; the caller gives the cosine of every candidate, so only keyword scores
    are ever missing: the entry did not match a word).  Returns (id, score) best first."""
    def scaled(scores: dict[int, float]) -> dict[int, float]:
        if not scores:
            return {}
        lo, hi = min(scores.values()), max(scores.values())
        return {i: (s - lo) / (hi - lo) if hi > lo else 1.0 for i, s in scores.items()}

    sem, kw = scaled(semantic), scaled(keyword)
    fused = {i: alpha * sem.get(i, 0.0) + (1 - alpha) * kw.get(i, 0.0) for i in sem.keys() | kw.keys()}
    return sorted(fused.items(), key=lambda item: -item[1])


class _Vectors:
    """One namespace's vectors: rows ``0..n-1`` of a float32 matrix (grown by doubling), ``ids[row]`` and
    ``row[id]``.  Removing swaps the last row into the hole."""

    def __init__(self, dim: int):
        self.mat = np.zeros((16, dim), dtype=np.float32)
        self.ids = np.zeros(16, dtype=np.int64)
        self.row: dict[int, int] = {}
        self.n = 0

    def add(self, ids: list[int], vectors: np.ndarray) -> None:
        need = self.n + len(ids)
        if need > len(self.ids):
            cap = max(need, 2 * len(self.ids))
            mat = np.zeros((cap, self.mat.shape[1]), dtype=np.float32)
            mat[:self.n] = self.mat[:self.n]
            idv = np.zeros(cap, dtype=np.int64)
            idv[:self.n] = self.ids[:self.n]
            self.mat, self.ids = mat, idv
        self.mat[self.n:need] = vectors
        self.ids[self.n:need] = ids
        for offset, entry_id in enumerate(ids):
            self.row[entry_id] = self.n + offset
        self.n = need

    def remove(self, entry_id: int) -> None:
        row = self.row.pop(entry_id)
        last = self.n - 1
        if row != last:
            self.mat[row] = self.mat[last]
            moved = int(self.ids[last])
            self.ids[row] = moved
            self.row[moved] = row
        self.n = last

    def top(self, query: np.ndarray, n: int, accept=None) -> list[tuple[int, float]]:
        """The ``n`` best (id, cosine) for ``query``, best first.  With ``accept`` (a function from an array
        of candidate ids to the set of those that pass a filter), only accepted ids: the best ``8n`` are
        checked, then ``64n``, ... -- a filter that passes a fair share of entries costs one check of a few
        hundred ids; ``None`` comes back if it passed too few of the best ``FILTER_PROBE`` (then filter
        first: the caller's job)."""
        scores = self.mat[:self.n] @ query
        if accept is None:
            return self._pick(scores, self._best(scores, n))
        m = 8 * n
        while True:
            rows = self._best(scores, m)
            ok = accept(self.ids[rows])
            out = self._pick(scores, [r for r in rows if int(self.ids[r]) in ok])[:n]
            if len(out) == n or m >= self.n:
                return out
            if m >= FILTER_PROBE:
                return None
            m *= 8

    def top_among(self, query: np.ndarray, n: int, ids) -> list[tuple[int, float]]:
        """The ``n`` best (id, cosine) for ``query`` among ``ids``, best first."""
        rows = np.fromiter((self.row[i] for i in ids if i in self.row), dtype=np.int64)
        scores = self.mat[rows] @ query
        return [(int(self.ids[rows[b]]), float(scores[b])) for b in self._best(scores, n)]

    @staticmethod
    def _best(scores: np.ndarray, n: int) -> np.ndarray:
        """Indexes of the ``n`` highest ``scores``, highest first."""
        best = np.argpartition(-scores, n - 1)[:n] if len(scores) > n else np.arange(len(scores))
        return best[np.argsort(-scores[best], kind="stable")]

    def _pick(self, scores: np.ndarray, rows) -> list[tuple[int, float]]:
        return [(int(self.ids[r]), float(scores[r])) for r in rows]

    def score(self, ids, query: np.ndarray) -> dict[int, float]:
        """Cosine of ``query`` with each of ``ids`` that has a row."""
        ids = [i for i in ids if i in self.row]
        scores = self.mat[[self.row[i] for i in ids]] @ query if ids else []
        return {i: float(s) for i, s in zip(ids, scores)}

    def nbytes(self) -> int:
        """RAM held, growth room included."""
        return self.mat.nbytes + self.ids.nbytes


class _Resident:
    """A resident entry and its LRU-K history: ``last`` and ``prev`` (the two most recent accesses; prev None
    after one) and ``seq``, the number of its latest access (identifies its live heap key)."""

    __slots__ = ("id", "ns_id", "text", "metadata", "created_at", "size", "cost", "last", "prev", "seq")

    def __init__(self, entry_id, ns_id, text, metadata, created_at, size):
        self.id, self.ns_id, self.text, self.metadata = entry_id, ns_id, text, metadata
        self.created_at, self.size = created_at, size
        self.cost = size + ENTRY_OVERHEAD
        self.last = self.prev = None
        self.seq = 0

    def record(self) -> dict:
        """What ``get`` returns (a copy: callers cannot change the cache)."""
        return {"id": self.id, "text": self.text, "metadata": dict(self.metadata), "created_at": self.created_at,
                "size": self.size}

    def hit(self, score: float) -> dict:
        """What ``search`` returns for this entry."""
        return {"id": self.id, "score": score, "text": self.text, "metadata": dict(self.metadata)}


class _NsCounters:
    __slots__ = ("entries", "bytes", "resident", "resident_bytes", "hits", "misses", "evictions", "page_ins")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)


# ---------------------------------------------------------------------------------------------- the manager

class MemoryManager:
    """Agents' memory in one SQLite file (created if missing).  All methods are thread-safe; embedding runs
    outside the lock.  ``ram_budget_bytes``, ``evict_threshold``, ``evict_target`` and ``k`` set residency
    (module docstring).  ``fusion`` (``"rrf"`` or ``"linear"`` with weight ``alpha`` on the semantic score)
    picks hybrid ranking; it is a knob for measurement, the default is the measured best.

    If the file was written with another embedder (``name``/``dim`` differ), every entry is re-embedded on
    open (logged; ~25 s per 100k entries with WordLlama)."""

    def __init__(self, path: str | os.PathLike, *, embedder: Embedder, ram_budget_bytes: int = 64 << 20,
                 evict_threshold: float = 0.8, evict_target: float = 0.7, k: int = 2, clock=time.monotonic,
                 fusion: str = "linear", alpha: float = 0.7):
        if k != 2:
            raise ValueError("only LRU-K with k=2 is implemented")
        if not 0.0 <= evict_target <= evict_threshold <= 1.0:
            raise ValueError("need 0 <= evict_target <= evict_threshold <= 1")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}")
        self._embedder = embedder
        self._budget = int(ram_budget_bytes)
        self._threshold, self._target, self._k = evict_threshold, evict_target, k
        self._clock = clock
        self._fusion, self._alpha = fusion, alpha
        self._lock = threading.Lock()
        self._ns_ids: dict[str, int] = {}
        self._counters: dict[int, _NsCounters] = {}
        self._vectors: dict[int, _Vectors] = {}
        self._cache: dict[int, _Resident] = {}
        self._heap: list[tuple] = []
        self._history: OrderedDict[int, tuple] = OrderedDict()  # evicted id -> (last, prev)
        self._seq = 0
        self._resident_bytes = 0
        try:
            self._db: sqlite3.Connection | None = sqlite3.connect(
                os.fspath(path), isolation_level=None, check_same_thread=False)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise MemoryError("EIO", f"cannot open the memory database {os.fspath(path)!r} ({e}); check that "
                                     "its directory exists and is writable, and that no other kernel uses it") from e
        if mode != "wal":
            log.warning("memory: %s is in journal mode %r, not WAL (a filesystem without shared memory?); "
                        "writes stay durable but readers wait for writers", path, mode)
        self._check_embedder()
        self._load()

    # -- open

    def _check_embedder(self) -> None:
        """Record the embedder in the file; re-embed every entry if the file's vectors came from another."""
        want = f"{self._embedder.name}/{self._embedder.dim}"
        row = self._db.execute("SELECT value FROM config WHERE key = 'embedder'").fetchone()
        if row is not None and row[0] == want:
            return
        ids = [r[0] for r in self._db.execute("SELECT id FROM entries ORDER BY id")]
        if ids:
            log.warning("memory: %s was embedded with %s, re-embedding its %d entries with %s",
                        self._db, row[0] if row else "?", len(ids), want)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for start in range(0, len(ids), EMBED_BATCH):
                chunk = ids[start:start + EMBED_BATCH]
                marks = ",".join("?" * len(chunk))
                texts = self._db.execute(f"SELECT id, text FROM entries WHERE id IN ({marks}) ORDER BY id",
                                         chunk).fetchall()
                vectors = self._embed([t for _, t in texts])
                self._db.executemany("UPDATE entries SET vector = ? WHERE id = ?",
                                     [(v.tobytes(), i) for (i, _), v in zip(texts, vectors)])
            self._db.execute("INSERT OR REPLACE INTO config VALUES ('embedder', ?)", (want,))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _load(self) -> None:
        """Namespaces, usage and every vector from the file; no entry is resident yet."""
        for ns_id, name in self._db.execute("SELECT id, name FROM namespaces"):
            self._ns_ids[name] = ns_id
            self._counters[ns_id] = _NsCounters()
            self._vectors[ns_id] = _Vectors(self._embedder.dim)
        for ns_id, count, size in self._db.execute(
                "SELECT ns_id, COUNT(*), SUM(size) FROM entries GROUP BY ns_id"):
            self._counters[ns_id].entries, self._counters[ns_id].bytes = count, size
        for ns_id, vectors in self._vectors.items():
            rows = self._db.execute("SELECT id, vector FROM entries WHERE ns_id = ? ORDER BY id", (ns_id,)).fetchall()
            if rows:
                mat = np.frombuffer(b"".join(v for _, v in rows), dtype=np.float32)
                vectors.add([i for i, _ in rows], mat.reshape(len(rows), self._embedder.dim))

    # -- helpers (callers hold the lock unless noted)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise MemoryError("EIO", "the memory manager is closed (the kernel is shutting down); retry later")
        return self._db

    def _embed(self, texts: list[str]) -> np.ndarray:
        """Normalised vectors for ``texts`` (no lock needed); checks the embedder's shape."""
        vectors = np.array(self._embedder.embed(texts), dtype=np.float32)
        if vectors.shape != (len(texts), self._embedder.dim):
            raise RuntimeError(f"embedder {self._embedder.name} returned shape {vectors.shape}, "
                               f"expected {(len(texts), self._embedder.dim)}")
        return normalise(vectors)

    def _write(self, statements) -> None:
        """Run ``statements(conn)`` in one IMMEDIATE transaction and commit (fsynced); EIO on failure."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            statements(conn)
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise MemoryError("EIO", f"the memory database could not be written ({e}); "
                                     "check free space in the kernel's state directory") from e

    @staticmethod
    def _filter_sql(ns_id: int, flt: dict, column: str) -> tuple[str, list]:
        """SQL conditions (`` AND ...``) that ``column`` (an entry id) matches every key of ``flt``."""
        sql, args = [], []
        for key, value in flt.items():
            kind, v = _meta_kind(value)
            sql.append(f" AND {column} IN (SELECT entry_id FROM entry_meta "
                       "WHERE ns_id = ? AND key = ? AND kind = ? AND value = ?)")
            args += [ns_id, key, kind, v]
        return "".join(sql), args

    def _filter_ids(self, ns_id: int, flt: dict, among: list[int] | None = None) -> set[int]:
        """The ids of namespace ``ns_id`` (of ``among``, if given) whose metadata matches every key of
        ``flt`` (non-empty)."""
        parts, args = [], []
        within = " AND entry_id IN (SELECT value FROM json_each(?))" if among is not None else ""
        for key, value in flt.items():
            parts.append(f"SELECT entry_id FROM entry_meta WHERE ns_id = ? AND key = ? AND kind = ? AND value = ?"
                         f"{within}")
            args += [ns_id, key, *_meta_kind(value)] + ([json.dumps(among)] if among is not None else [])
        return {i for (i,) in self._conn().execute(" INTERSECT ".join(parts), args)}

    def _touch(self, r: _Resident) -> None:
        """Record an access to resident ``r`` (now) and push its new heap key."""
        r.prev, r.last = r.last, self._clock()
        self._seq += 1
        r.seq = self._seq
        heapq.heappush(self._heap, (-math.inf if r.prev is None else r.prev, r.last, r.seq, r.id))
        if len(self._heap) > 2 * len(self._cache) + RETAINED_MIN:
            self._heap = [(-math.inf if e.prev is None else e.prev, e.last, e.seq, e.id)
                          for e in self._cache.values()]
            heapq.heapify(self._heap)

    def _make_resident(self, r: _Resident) -> None:
        """Cache ``r`` (its history restored if it was evicted before) and count the access."""
        r.last, r.prev = self._history.pop(r.id, (None, None))
        self._cache[r.id] = r
        self._resident_bytes += r.cost
        c = self._counters[r.ns_id]
        c.resident += 1
        c.resident_bytes += r.cost
        self._touch(r)

    def _drop_resident(self, r: _Resident) -> None:
        del self._cache[r.id]
        self._resident_bytes -= r.cost
        c = self._counters[r.ns_id]
        c.resident -= 1
        c.resident_bytes -= r.cost

    def _evict(self) -> None:
        """If over the threshold, evict LRU-K victims until at most the target (module docstring)."""
        if self._resident_bytes <= self._threshold * self._budget:
            return
        target = self._target * self._budget
        while self._resident_bytes > target and self._heap:
            _, _, seq, entry_id = heapq.heappop(self._heap)
            r = self._cache.get(entry_id)
            if r is None or r.seq != seq:
                continue  # stale key: evicted, deleted, or accessed again since
            self._drop_resident(r)
            self._counters[r.ns_id].evictions += 1
            self._history[entry_id] = (r.last, r.prev)
            while len(self._history) > max(RETAINED_MIN, len(self._cache)):
                self._history.popitem(last=False)

    def _resident(self, ns_id: int, ids: list[int]) -> dict[int, _Resident]:
        """The entries ``ids`` of namespace ``ns_id`` that exist, made resident (paged in from SQLite where
        evicted), each access recorded and counted as a hit or a miss.  Call ``_evict`` after."""
        c = self._counters[ns_id]
        found, missing = {}, []
        for entry_id in ids:
            r = self._cache.get(entry_id)
            if r is None:
                missing.append(entry_id)
            elif r.ns_id == ns_id:
                self._touch(r)
                c.hits += 1
                found[entry_id] = r
        if missing:
            marks = ",".join("?" * len(missing))
            rows = self._conn().execute(
                f"SELECT id, text, metadata, created_at, size FROM entries WHERE ns_id = ? AND id IN ({marks})",
                [ns_id, *missing]).fetchall()
            for entry_id, text, metadata, created_at, size in rows:
                r = _Resident(entry_id, ns_id, text, json.loads(metadata), created_at, size)
                self._make_resident(r)
                c.misses += 1
                c.page_ins += 1
                found[entry_id] = r
        return found

    def _namespace_id(self, ns: str) -> int | None:
        return self._ns_ids.get(ns)

    # -- API

    def add(self, ns: str, text: str, metadata: dict | None = None, *, quota_bytes: int | None = None,
            quota_entries: int | None = None) -> dict:
        """Store one entry in namespace ``ns``; returns ``{"id", "size", "created_at"}`` once it is committed.
        EINVAL/E2BIG for arguments out of bounds, EDQUOT (nothing written) if the namespace would pass
        ``quota_bytes`` (sum of entry sizes) or ``quota_entries``."""
        return self.add_many(ns, [(text, metadata)], quota_bytes=quota_bytes, quota_entries=quota_entries)[0]

    def add_many(self, ns: str, items: list[tuple[str, dict | None]], *, quota_bytes: int | None = None,
                 quota_entries: int | None = None) -> list[dict]:
        """``add`` for several (text, metadata) pairs in one transaction (all or nothing) and one embedder
        call: for imports and benchmarks.  Returns the ``add`` results in order."""
        _check_namespace(ns)
        if quota_bytes is not None:
            _check_int("quota_bytes", quota_bytes, 0, _INT64[1])
        if quota_entries is not None:
            _check_int("quota_entries", quota_entries, 0, _INT64[1])
        rows = []
        for text, metadata in items:
            _check_text(text)
            meta = _check_metadata(metadata)
            meta_json = json.dumps(meta, ensure_ascii=False, separators=(",", ":"))
            rows.append((text, meta, meta_json, len(text.encode()) + len(meta_json.encode())))
        vectors = self._embed([r[0] for r in rows])
        with self._lock:
            self._conn()  # not closed
            return self._insert(ns, rows, vectors, quota_bytes, quota_entries)

    def _insert(self, ns, rows, vectors, quota_bytes, quota_entries) -> list[dict]:
        ns_id = self._namespace_id(ns)
        c = self._counters.get(ns_id) or _NsCounters()
        added = sum(r[3] for r in rows)
        if quota_entries is not None and c.entries + len(rows) > quota_entries:
            raise MemoryError("EDQUOT", f"namespace {ns!r} holds {c.entries} memory entries; {len(rows)} more "
                                        f"would pass its quota of {quota_entries}: delete some first")
        if quota_bytes is not None and c.bytes + added > quota_bytes:
            raise MemoryError("EDQUOT", f"namespace {ns!r} holds {c.bytes} bytes of memory; {added} more would "
                                        f"pass its quota of {quota_bytes}: delete entries first")
        now = time.time()
        ids: list[int] = []
        created: list[int] = []

        def statements(conn):
            nonlocal ns_id
            if ns_id is None:
                ns_id = conn.execute("INSERT INTO namespaces(name) VALUES (?)", (ns,)).lastrowid
                created.append(ns_id)
                conn.execute(f"CREATE VIEW ns_text_{ns_id} AS SELECT id, text FROM entries WHERE ns_id = {ns_id}")
                conn.execute(f"CREATE VIRTUAL TABLE fts_{ns_id} USING fts5(text, content='ns_text_{ns_id}', "
                             "content_rowid='id', tokenize='porter unicode61')")
            for (text, meta, meta_json, size), vector in zip(rows, vectors):
                ids.append(conn.execute(
                    "INSERT INTO entries(ns_id, text, metadata, created_at, size, vector) VALUES (?,?,?,?,?,?)",
                    (ns_id, text, meta_json, now, size, vector.tobytes())).lastrowid)
            conn.executemany(f"INSERT INTO fts_{ns_id}(rowid, text) VALUES (?, ?)",
                             [(i, r[0]) for i, r in zip(ids, rows)])
            conn.executemany("INSERT INTO entry_meta VALUES (?,?,?,?,?)",
                             [(ns_id, key, *_meta_kind(value), i)
                              for i, r in zip(ids, rows) for key, value in r[1].items()])

        self._write(statements)
        if created:
            self._ns_ids[ns] = ns_id
            self._counters[ns_id] = c
            self._vectors[ns_id] = _Vectors(self._embedder.dim)
        c.entries += len(rows)
        c.bytes += added
        self._vectors[ns_id].add(ids, vectors)
        for entry_id, (text, meta, _, size) in zip(ids, rows):
            self._make_resident(_Resident(entry_id, ns_id, text, meta, now, size))
        self._evict()
        return [{"id": i, "size": r[3], "created_at": now} for i, r in zip(ids, rows)]

    def get(self, ns: str, entry_id: int) -> dict:
        """The entry ``{"id", "text", "metadata", "created_at", "size"}`` (paged in if evicted); ENOENT if
        namespace ``ns`` has no entry ``entry_id``."""
        _check_namespace(ns)
        _check_entry_id(entry_id)
        with self._lock:
            self._conn()  # not closed
            ns_id = self._namespace_id(ns)
            found = self._resident(ns_id, [entry_id]) if ns_id is not None else {}
            if entry_id not in found:
                raise self._enoent(ns, entry_id)
            out = found[entry_id].record()
            self._evict()
            return out

    @staticmethod
    def _enoent(ns: str, entry_id: int) -> MemoryError:
        return MemoryError("ENOENT", f"namespace {ns!r} has no memory entry {entry_id} "
                                     "(deleted, or never added here); find ids with memory.list or memory.search")

    def list(self, ns: str, *, after: int = 0, limit: int = 100, filter: dict | None = None) -> dict:  # noqa: A002
        """Entries of ``ns`` with id > ``after`` in id order, at most ``limit``, matching ``filter``:
        ``{"entries": [{"id", "text" (first 200 chars), "metadata", "created_at", "size"}], "more": bool}``.
        Reads SQLite; pages nothing in and counts no access."""
        _check_namespace(ns)
        _check_int("after", after, 0, _INT64[1])
        _check_int("limit", limit, 1, MAX_LIMIT)
        flt = _check_metadata(filter, "filter")
        with self._lock:
            self._conn()  # not closed
            ns_id = self._namespace_id(ns)
            if ns_id is None:
                return {"entries": [], "more": False}
            where, args = self._filter_sql(ns_id, flt, "id")
            rows = self._conn().execute(
                f"SELECT id, substr(text, 1, {LIST_TEXT_CHARS}), metadata, created_at, size FROM entries "
                f"WHERE ns_id = ? AND id > ?{where} ORDER BY id LIMIT ?", [ns_id, after, *args, limit + 1]).fetchall()
        entries = [{"id": i, "text": t, "metadata": json.loads(m), "created_at": c, "size": s}
                   for i, t, m, c, s in rows[:limit]]
        return {"entries": entries, "more": len(rows) > limit}

    def delete(self, ns: str, entry_id: int) -> dict:
        """Remove entry ``entry_id`` of ``ns`` from the file (committed before returning), the index, RAM and
        search; ``{"deleted": True}``, or ENOENT."""
        _check_namespace(ns)
        _check_entry_id(entry_id)
        with self._lock:
            self._conn()  # not closed
            ns_id = self._namespace_id(ns)
            row = None if ns_id is None else self._conn().execute(
                "SELECT text, metadata, size FROM entries WHERE id = ? AND ns_id = ?", (entry_id, ns_id)).fetchone()
            if row is None:
                raise self._enoent(ns, entry_id)
            text, meta_json, size = row

            def statements(conn):
                conn.execute(f"INSERT INTO fts_{ns_id}(fts_{ns_id}, rowid, text) VALUES ('delete', ?, ?)",
                             (entry_id, text))
                conn.executemany("DELETE FROM entry_meta WHERE ns_id = ? AND key = ? AND kind = ? AND value = ? "
                                 "AND entry_id = ?", [(ns_id, key, *_meta_kind(value), entry_id)
                                                      for key, value in json.loads(meta_json).items()])
                conn.execute("DELETE FROM entries WHERE id = ?", (entry_id,))

            self._write(statements)
            self._vectors[ns_id].remove(entry_id)
            r = self._cache.get(entry_id)
            if r is not None:
                self._drop_resident(r)
            self._history.pop(entry_id, None)
            c = self._counters[ns_id]
            c.entries -= 1
            c.bytes -= size
        return {"deleted": True}

    def search(self, ns: str, query: str, k: int = 5, *, filter: dict | None = None,  # noqa: A002
               mode: str = "hybrid") -> dict:
        """The ``k`` entries of ``ns`` that best match ``query`` (and ``filter``), best first:
        ``{"hits": [{"id", "score", "text", "metadata"}]}``.  ``score`` is the cosine similarity in mode
        ``embedding``, BM25 (higher is better) in ``keyword``, the fused score in ``hybrid``.  Hits count as
        accesses (evicted ones are paged in)."""
        _check_namespace(ns)
        _check_str("query", query, MAX_QUERY)
        _check_int("k", k, 1, MAX_K)
        flt = _check_metadata(filter, "filter")
        if mode not in MODES:
            raise _einval(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        qvec = self._embed([query])[0] if mode != "keyword" else None
        with self._lock:
            self._conn()  # not closed
            ns_id = self._namespace_id(ns)
            if ns_id is None:
                return {"hits": []}
            ranked = self._rank(ns_id, query, qvec, k, flt, mode)
            found = self._resident(ns_id, [i for i, _ in ranked])
            hits = [found[i].hit(score) for i, score in ranked if i in found]
            self._evict()
        return {"hits": hits}

    def _rank(self, ns_id, query, qvec, k, flt, mode) -> list[tuple[int, float]]:
        """(id, score) of the best ``k``, best first."""
        n = k if mode != "hybrid" else max(k, CANDIDATES)
        semantic = self._semantic_top(ns_id, qvec, n, flt) if mode != "keyword" else []
        keyword = self._keyword_top(ns_id, query, n, flt) if mode != "embedding" else []
        if mode == "embedding":
            return semantic
        if mode == "keyword":
            return keyword
        if self._fusion == "rrf":
            return fuse_rrf([[i for i, _ in semantic], [i for i, _ in keyword]])[:k]
        cosines = dict(semantic)
        cosines.update(self._vectors[ns_id].score([i for i, _ in keyword if i not in cosines], qvec))
        return fuse_linear(cosines, dict(keyword), self._alpha)[:k]

    def _semantic_top(self, ns_id: int, qvec: np.ndarray, n: int, flt: dict) -> list[tuple[int, float]]:
        """The ``n`` best (id, cosine) that match ``flt``: the best by cosine are checked against the filter
        (``_Vectors.top``), and only a filter too selective for that is resolved first (its ids are few)."""
        vectors = self._vectors[ns_id]
        if not flt:
            return vectors.top(qvec, n)
        out = vectors.top(qvec, n, lambda ids: self._filter_ids(ns_id, flt, [int(i) for i in ids]))
        return out if out is not None else vectors.top_among(qvec, n, self._filter_ids(ns_id, flt))

    def _keyword_top(self, ns_id: int, query: str, n: int, flt: dict) -> list[tuple[int, float]]:
        """The ``n`` best (id, -bm25) by FTS5, best first, over the query's rarest words.

        BM25 costs about 1 us per matching entry, so a query of common words over 100k entries would cost tens
        of ms.  Each word's entry count is looked up first (~0.2 ms), and the words are taken rarest first
        while their matches total at most ``KEYWORD_POSTINGS`` (the rarest always): the words left out are the
        least discriminating, and the semantic score still sees them."""
        table = f"fts_{ns_id}"
        conn = self._conn()
        counted = sorted((conn.execute(f"SELECT count(*) FROM {table} WHERE {table} MATCH ?",
                                       (f'"{w}"',)).fetchone()[0], w) for w in _query_words(query))
        words, total = [], 0
        for count, word in counted:
            if count == 0:
                continue
            if words and total + count > KEYWORD_POSTINGS:
                break
            words.append(word)
            total += count
        if not words:
            return []
        expr = " OR ".join(f'"{w}"' for w in words)
        # "+rowid": without the unary plus SQLite hands the IN list to FTS5 as rowid lookups, 100x slower
        where, args = self._filter_sql(ns_id, flt, "+rowid")
        rows = conn.execute(f"SELECT rowid, bm25({table}) AS s FROM {table} WHERE {table} MATCH ?{where} "
                            "ORDER BY s LIMIT ?", [expr, *args, n]).fetchall()
        return [(i, -s) for i, s in rows]

    def stats(self, ns: str | None = None) -> dict:
        """Residency and cache counters for namespace ``ns``, or for all namespaces (None):
        ``{"entries", "resident_entries", "evicted_entries", "resident_bytes", "vector_bytes", "hits",
        "misses", "evictions", "page_ins", "budget_bytes", "evict_threshold", "evict_target", "k"}``
        (budget and thresholds are global)."""
        if ns is not None:
            _check_namespace(ns)
        with self._lock:
            if ns is None:
                counters = list(self._counters.values())
                vector_bytes = sum(v.nbytes() for v in self._vectors.values())
            else:
                ns_id = self._namespace_id(ns)
                counters = [self._counters[ns_id]] if ns_id is not None else []
                vector_bytes = self._vectors[ns_id].nbytes() if ns_id is not None else 0
            total = {name: sum(getattr(c, name) for c in counters) for name in _NsCounters.__slots__}
        return {"entries": total["entries"], "resident_entries": total["resident"],
                "evicted_entries": total["entries"] - total["resident"], "resident_bytes": total["resident_bytes"],
                "vector_bytes": vector_bytes, "hits": total["hits"], "misses": total["misses"],
                "evictions": total["evictions"], "page_ins": total["page_ins"], "budget_bytes": self._budget,
                "evict_threshold": self._threshold, "evict_target": self._target, "k": self._k}

    def usage(self, ns: str) -> dict:
        """``{"entries", "bytes"}`` of namespace ``ns`` (bytes: the sum of its entries' sizes), for quotas."""
        _check_namespace(ns)
        with self._lock:
            c = self._counters.get(self._namespace_id(ns))
            return {"entries": c.entries, "bytes": c.bytes} if c else {"entries": 0, "bytes": 0}

    def warm(self) -> None:
        """Load the embedder now (WordLlama: ~0.3 s and ~60 MiB), so that the first search does not pay for it
        and the kernel's memory is at its working size from the start."""
        self._embed(["warm up"])

    def usage_now(self, ns: str) -> dict:
        """``usage(ns)`` without waiting for the lock (a search may hold it for milliseconds): for the quota
        checks of the kernel's other threads.  It may lag a write in progress by one entry."""
        c = self._counters.get(self._ns_ids.get(ns))
        return {"entries": c.entries, "bytes": c.bytes} if c else {"entries": 0, "bytes": 0}

    def close(self) -> None:
        """Close the file (everything is already committed); later calls fail with EIO."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
