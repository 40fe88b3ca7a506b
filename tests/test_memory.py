"""The memory manager (kernel/memory.py) on real SQLite files: every call's round trip, bounds, quotas,
namespace isolation, restart, LRU-K eviction and paging, deletion, filters, threads -- with the test-only
HashEmbedder -- and one semantic search with the real WordLlama embedder (kernel/embed.py)."""
from __future__ import annotations

import math
import sqlite3
import threading

import numpy as np
import pytest

from kernel.embed import HashEmbedder, WordLlamaEmbedder
from kernel.memory import ENTRY_OVERHEAD, MAX_TEXT, MemoryError, MemoryManager

pytestmark = pytest.mark.timeout(120)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CountingEmbedder(HashEmbedder):
    """HashEmbedder that counts the texts it embedded."""

    def __init__(self, dim: int = 256):
        super().__init__(dim)
        self.texts = 0

    def embed(self, texts):
        self.texts += len(texts)
        return super().embed(texts)


@pytest.fixture
def mm(tmp_path):
    m = MemoryManager(tmp_path / "memory.db", embedder=HashEmbedder())
    yield m
    m.close()


def raises(code: str, fn, *args, match: str | None = None, **kwargs) -> MemoryError:
    with pytest.raises(MemoryError, match=match) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value
    return info.value


def resident_ids(m: MemoryManager) -> set[int]:
    return set(m._cache)  # white box: which entries are in RAM, without touching them


# ------------------------------------------------------------------------------------------ round trip

def test_round_trip_of_every_call(mm):
    meta = {"kind": "pref", "n": 3, "x": 0.5, "ok": True, "empty": ""}
    a = mm.add("agent", "The user prefers dark mode in the editor.", meta)
    assert set(a) == {"id", "size", "created_at"}
    assert a["size"] == len("The user prefers dark mode in the editor.") + len(
        '{"kind":"pref","n":3,"x":0.5,"ok":true,"empty":""}')
    b = mm.add("agent", "Meeting with Bob on Friday about the budget.")

    got = mm.get("agent", a["id"])
    assert got == {"id": a["id"], "text": "The user prefers dark mode in the editor.", "metadata": meta,
                   "created_at": a["created_at"], "size": a["size"]}
    got["metadata"]["kind"] = "changed"  # a copy: the manager's state is not touched
    assert mm.get("agent", a["id"])["metadata"] == meta

    listed = mm.list("agent")
    assert listed["more"] is False
    assert [e["id"] for e in listed["entries"]] == [a["id"], b["id"]]
    assert listed["entries"][1] == {"id": b["id"], "text": "Meeting with Bob on Friday about the budget.",
                                    "metadata": {}, "created_at": b["created_at"], "size": b["size"]}

    hits = mm.search("agent", "dark mode editor", k=2)["hits"]
    assert hits[0]["id"] == a["id"] and set(hits[0]) == {"id", "score", "text", "metadata"}
    assert hits[0]["text"] == "The user prefers dark mode in the editor." and hits[0]["metadata"] == meta
    assert hits[0]["score"] >= hits[1]["score"]
    for mode in ("embedding", "keyword", "hybrid"):
        assert mm.search("agent", "budget Friday", mode=mode)["hits"][0]["id"] == b["id"], mode

    assert mm.usage("agent") == {"entries": 2, "bytes": a["size"] + b["size"]}
    assert mm.usage("nobody") == {"entries": 0, "bytes": 0}
    stats = mm.stats("agent")
    assert stats["entries"] == 2 and stats["resident_entries"] == 2 and stats["evicted_entries"] == 0
    assert stats["resident_bytes"] == a["size"] + b["size"] + 2 * ENTRY_OVERHEAD
    assert stats["vector_bytes"] >= 2 * 256 * 4 and stats["hits"] > 0 and stats["misses"] == 0
    assert {"evictions", "page_ins", "budget_bytes", "evict_threshold", "evict_target"} <= set(stats)

    assert mm.delete("agent", a["id"]) == {"deleted": True}
    raises("ENOENT", mm.get, "agent", a["id"])
    raises("ENOENT", mm.delete, "agent", a["id"])
    assert mm.usage("agent") == {"entries": 1, "bytes": b["size"]}


def test_write_through_is_visible_to_another_connection_before_close(mm, tmp_path):
    entry = mm.add("agent", "committed before add returns")
    other = sqlite3.connect(tmp_path / "memory.db")
    assert other.execute("SELECT text FROM entries WHERE id = ?", (entry["id"],)).fetchone() == (
        "committed before add returns",)
    assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    mm.delete("agent", entry["id"])
    assert other.execute("SELECT count(*) FROM entries").fetchone() == (0,)
    other.close()


def test_list_pages_and_truncates(mm):
    ids = [r["id"] for r in mm.add_many("agent", [(f"note {i} " + "x" * 300, {"i": i}) for i in range(7)])]
    first = mm.list("agent", limit=3)
    assert [e["id"] for e in first["entries"]] == ids[:3] and first["more"] is True
    assert len(first["entries"][0]["text"]) == 200 and first["entries"][0]["size"] > 300
    rest = mm.list("agent", after=ids[2], limit=10)
    assert [e["id"] for e in rest["entries"]] == ids[3:] and rest["more"] is False
    assert mm.list("agent", after=ids[-1]) == {"entries": [], "more": False}
    assert mm.list("nobody") == {"entries": [], "more": False}


# ------------------------------------------------------------------------------------------ bounds, quotas

@pytest.mark.parametrize("call, rule", [
    (lambda m: m.add("a", ""), "text must be 1..65536 characters"),
    (lambda m: m.add("a", "nul \x00 here"), "text must not contain NUL"),
    (lambda m: m.add("a", 42), "text must be a string"),
    (lambda m: m.add("a", "bad \ud800 surrogate"), "lone surrogate"),
    (lambda m: m.add("", "x"), "namespace must be 1..256 characters"),
    (lambda m: m.add("a", "x", {f"k{i}": i for i in range(33)}), "metadata has 33 keys, over the maximum of 32"),
    (lambda m: m.add("a", "x", {"k" * 65: 1}), "metadata key must be 1..64 characters"),
    (lambda m: m.add("a", "x", {1: 1}), "metadata key must be a string"),
    (lambda m: m.add("a", "x", {"k": "v" * 1025}), r"metadata\['k'\] must be 0..1024 characters"),
    (lambda m: m.add("a", "x", {"k": math.nan}), r"metadata\['k'\] must be a finite number"),
    (lambda m: m.add("a", "x", {"k": math.inf}), r"metadata\['k'\] must be a finite number"),
    (lambda m: m.add("a", "x", {"k": [1]}), r"metadata\['k'\] must be str, int, float or bool"),
    (lambda m: m.add("a", "x", {"k": None}), r"metadata\['k'\] must be str, int, float or bool"),
    (lambda m: m.add("a", "x", {"k": 1 << 63}), r"metadata\['k'\] must be in"),
    (lambda m: m.add("a", "x", ["k"]), "metadata must be a map"),
    (lambda m: m.add("a", "x", quota_bytes=-1), "quota_bytes must be in 0.."),
    (lambda m: m.search("a", "q" * 4097), "query must be 1..4096 characters"),
    (lambda m: m.search("a", ""), "query must be 1..4096 characters"),
    (lambda m: m.search("a", "q", k=0), "k must be in 1..100"),
    (lambda m: m.search("a", "q", k=101), "k must be in 1..100"),
    (lambda m: m.search("a", "q", k=True), "k must be an integer"),
    (lambda m: m.search("a", "q", mode="fuzzy"), "mode must be one of embedding, keyword, hybrid"),
    (lambda m: m.search("a", "q", filter={"k": math.nan}), r"filter\['k'\] must be a finite number"),
    (lambda m: m.list("a", limit=0), "limit must be in 1..1000"),
    (lambda m: m.list("a", limit=1001), "limit must be in 1..1000"),
    (lambda m: m.list("a", after=-1), "after must be in 0.."),
    (lambda m: m.get("a", "1"), "entry id must be an integer"),
    (lambda m: m.delete("a", 1.0), "entry id must be an integer"),
])
def test_bounds_are_einval_naming_the_rule(mm, call, rule):
    raises("EINVAL", call, mm, match=rule)
    assert mm.usage("a") == {"entries": 0, "bytes": 0}


def test_text_over_the_maximum_is_e2big(mm):
    err = raises("E2BIG", mm.add, "a", "x" * (MAX_TEXT + 1))
    assert "split it into several entries" in str(err)
    assert mm.add("a", "x" * MAX_TEXT)["size"] == MAX_TEXT + 2


def test_quota_is_edquot_and_nothing_is_written(mm, tmp_path):
    first = mm.add("a", "one", quota_entries=2)
    mm.add("a", "two", quota_entries=2)
    err = raises("EDQUOT", mm.add, "a", "three", quota_entries=2)
    assert "quota of 2" in str(err) and "delete" in str(err)
    used = mm.usage("a")["bytes"]
    raises("EDQUOT", mm.add, "b", "x" * 100, quota_bytes=99)
    raises("EDQUOT", mm.add, "a", "four", quota_bytes=used + 5)  # 4 text bytes + 2 for "{}" = 6
    raises("EDQUOT", mm.add_many, "a", [("five", None), ("six", None)], quota_entries=3)
    assert mm.usage("a") == {"entries": 2, "bytes": used} and mm.usage("b") == {"entries": 0, "bytes": 0}
    assert [e["text"] for e in mm.list("a")["entries"]] == ["one", "two"]
    assert mm.list("b")["entries"] == [] and mm.search("b", "x")["hits"] == []
    assert mm.add("a", "four", quota_bytes=used + 6)["id"] > first["id"]
    mm.close()
    again = MemoryManager(tmp_path / "memory.db", embedder=HashEmbedder())
    assert [e["text"] for e in again.list("a")["entries"]] == ["one", "two", "four"]
    assert again.usage("b") == {"entries": 0, "bytes": 0}
    again.close()


# ------------------------------------------------------------------------------------------ isolation

def test_a_namespace_cannot_reach_another_ones_entries(mm):
    secret = mm.add("alice", "alice's secret: the vault code is 7731", {"owner": "alice"})
    mm.add("bob", "bob's note about lunch")
    for ns in ("bob", "mallory"):  # a namespace with entries, and one without
        raises("ENOENT", mm.get, ns, secret["id"])
        raises("ENOENT", mm.delete, ns, secret["id"])
        for mode in ("embedding", "keyword", "hybrid"):
            hits = mm.search(ns, "alice secret vault code 7731", mode=mode, k=100)["hits"]
            assert all("alice" not in h["text"] for h in hits), (ns, mode)
        assert all("alice" not in e["text"] for e in mm.list(ns, limit=1000)["entries"])
        assert mm.list(ns, filter={"owner": "alice"})["entries"] == []
        assert mm.search(ns, "vault", filter={"owner": "alice"})["hits"] == []
    mm.get("alice", secret["id"])
    mm._cache.clear()  # white box: the isolation also holds when the entry is paged in from SQLite
    raises("ENOENT", mm.get, "bob", secret["id"])
    assert mm.get("alice", secret["id"])["text"] == "alice's secret: the vault code is 7731"
    assert mm.usage("alice")["entries"] == 1 and mm.usage("bob")["entries"] == 1


# ------------------------------------------------------------------------------------------ restart

def test_restart_keeps_everything_searchable_without_reembedding(tmp_path):
    path = tmp_path / "memory.db"
    first = MemoryManager(path, embedder=CountingEmbedder())
    texts = [f"entry {i}: the {w} report is due on {d}" for i, (w, d) in
             enumerate([("budget", "Monday"), ("travel", "Tuesday"), ("security", "Friday")] * 10)]
    ids = [first.add("agent", t, {"i": i})["id"] for i, t in enumerate(texts)]
    first.delete("agent", ids[0])
    before = {i: first.get("agent", i) for i in ids[1:]}
    search_before = first.search("agent", "security report Friday", k=5)
    first.close()
    raises("EIO", first.get, "agent", ids[1])

    embedder = CountingEmbedder()
    second = MemoryManager(path, embedder=embedder)
    assert embedder.texts == 0  # vectors came from the file
    assert second.usage("agent")["entries"] == len(texts) - 1
    assert second.stats()["resident_entries"] == 0
    assert {i: second.get("agent", i) for i in ids[1:]} == before
    raises("ENOENT", second.get, "agent", ids[0])
    assert second.search("agent", "security report Friday", k=5) == search_before
    assert second.search("agent", "security", mode="keyword", k=100)["hits"]
    assert embedder.texts == 1  # the one query that needed a vector (keyword mode embeds nothing)
    later = second.add("agent", "added after the restart")
    assert later["id"] > max(ids)  # ids are never reused
    second.close()


def test_an_unopenable_file_is_eio_saying_what_to_check(tmp_path):
    err = raises("EIO", MemoryManager, tmp_path / "missing" / "memory.db", embedder=HashEmbedder())
    assert "directory exists and is writable" in str(err)


def test_reopening_with_another_embedder_reembeds(tmp_path):
    path = tmp_path / "memory.db"
    first = MemoryManager(path, embedder=HashEmbedder(256))
    entry = first.add("agent", "the quick brown fox")
    first.close()
    embedder = CountingEmbedder(dim=64)
    embedder.name = "hash-trigram-64"
    second = MemoryManager(path, embedder=embedder)
    assert embedder.texts == 1
    assert second.search("agent", "quick brown fox", mode="embedding")["hits"][0]["id"] == entry["id"]
    second.close()


# ------------------------------------------------------------------------------------------ residency

def test_eviction_keeps_resident_bytes_under_budget_and_pages_back(tmp_path):
    budget = 16 * 1024
    m = MemoryManager(tmp_path / "memory.db", embedder=HashEmbedder(), ram_budget_bytes=budget)
    added = []
    for i in range(150):
        meta = {"i": i, "tag": f"t{i % 7}", "f": i / 3, "b": i % 2 == 0}
        added.append((m.add("agent", f"note {i}: " + "lorem ipsum " * (i % 20), meta)["id"], meta))
        assert m.stats()["resident_bytes"] <= 0.8 * budget
    stats = m.stats()
    assert stats["evictions"] > 0 and stats["evicted_entries"] == stats["evictions"] > 100
    assert stats["resident_entries"] + stats["evicted_entries"] == 150
    first_id, first_meta = added[0]
    assert first_id not in resident_ids(m)
    got = m.get("agent", first_id)
    assert got["text"] == "note 0: " and got["metadata"] == first_meta  # identical after the round trip
    after = m.stats()
    assert (after["misses"], after["page_ins"]) == (stats["misses"] + 1, stats["page_ins"] + 1)
    m.get("agent", first_id)
    assert m.stats()["hits"] == after["hits"] + 1
    for entry_id, meta in added:  # every evicted entry comes back intact
        assert m.get("agent", entry_id)["metadata"] == meta
        assert m.stats()["resident_bytes"] <= 0.8 * budget
    hits = m.search("agent", "note 3", k=20, mode="keyword")["hits"]
    assert hits and all(m.get("agent", h["id"])["text"] == h["text"] for h in hits)
    m.close()


def test_lru_k_evicts_entries_used_once_before_entries_used_twice(tmp_path):
    clock = Clock()
    text = "x" * 50  # every entry costs the same: 50 + len("{}") + ENTRY_OVERHEAD
    cost = 52 + ENTRY_OVERHEAD
    m = MemoryManager(tmp_path / "memory.db", embedder=HashEmbedder(), ram_budget_bytes=4 * cost,
                      evict_threshold=1.0, evict_target=1.0, clock=clock)  # room for exactly 4

    def at(t, fn, *args):
        clock.now = t
        return fn(*args)

    a, b, c, d = (at(t, m.add, "ns", text)["id"] for t in (1, 2, 3, 4))
    at(5, m.get, "ns", a)  # a and b are used twice ...
    at(6, m.get, "ns", b)
    e = at(7, m.add, "ns", text)["id"]  # ... so the entries used once go first, oldest first
    assert resident_ids(m) == {a, b, d, e}
    f = at(8, m.add, "ns", text)["id"]
    assert resident_ids(m) == {a, b, e, f}
    at(9, m.get, "ns", e)
    at(10, m.get, "ns", f)  # now all four are used twice: second-to-last accesses a 1, b 2, e 7, f 8
    g = at(11, m.add, "ns", text)["id"]
    assert resident_ids(m) == {a, b, e, f}  # the newcomer (used once) is the victim
    at(12, m.get, "ns", g)  # paged in with its history kept: now used twice (11, 12), so a (1, 5) goes
    assert resident_ids(m) == {b, e, f, g}
    assert m.stats()["evictions"] == 4 and m.stats()["page_ins"] == 1
    m.close()


def test_eviction_stays_cheap_with_many_entries(tmp_path):
    m = MemoryManager(tmp_path / "memory.db", embedder=HashEmbedder(16), ram_budget_bytes=200 * 300)
    for start in range(0, 5000, 500):
        m.add_many("ns", [(f"n{i}", None) for i in range(start, start + 500)])
    assert m.stats()["resident_entries"] < 200 and len(m._heap) <= 2 * len(m._cache) + 1024
    m.close()


# ------------------------------------------------------------------------------------------ delete, filter

def test_delete_removes_from_every_search(mm):
    keep = mm.add("agent", "Ticket INC-4821: login returns HTTP 502")["id"]
    gone = mm.add("agent", "Ticket INC-5530: CSV export drops rows", {"kind": "ticket"})["id"]
    others = [mm.add("agent", f"filler note number {i}")["id"] for i in range(5)]
    mm.delete("agent", gone)
    for mode in ("embedding", "keyword", "hybrid"):
        ids = [h["id"] for h in mm.search("agent", "INC-5530 CSV export drops rows", k=100, mode=mode)["hits"]]
        assert gone not in ids, mode
    assert mm.search("agent", "anything", filter={"kind": "ticket"})["hits"] == []
    assert [e["id"] for e in mm.list("agent")["entries"]] == [keep, *others]
    mm.delete("agent", others[-1])  # the last row of the matrix, then a middle one (swap-remove)
    mm.delete("agent", others[0])
    ids = {h["id"] for h in mm.search("agent", "note", k=100, mode="embedding")["hits"]}
    assert ids == {keep, *others[1:-1]}


def test_filter_is_exact_match_on_every_key(mm):
    e = [mm.add("agent", f"shared words for entry {i}", meta)["id"] for i, meta in enumerate([
        {"kind": "todo", "prio": 1, "done": False},
        {"kind": "todo", "prio": 2, "done": True},
        {"kind": "fact", "prio": 1.0, "done": False},
        {"kind": "fact", "prio": 1.5, "flag": 1},
        {"kind": "TODO"},
    ])]

    def listed(flt):
        return [x["id"] for x in mm.list("agent", filter=flt)["entries"]]

    def searched(flt, mode):
        return sorted(h["id"] for h in mm.search("agent", "shared words entry", k=10, filter=flt, mode=mode)["hits"])

    cases = [({"kind": "todo"}, [e[0], e[1]]), ({"prio": 1}, [e[0], e[2]]), ({"prio": 1.5}, [e[3]]),
             ({"kind": "todo", "prio": 2}, [e[1]]), ({"done": False}, [e[0], e[2]]), ({"done": 0}, []),
             ({"flag": True}, []), ({"flag": 1}, [e[3]]), ({"kind": "nope"}, []), ({}, e)]
    for flt, want in cases:
        assert listed(flt) == want, flt
        for mode in ("embedding", "keyword", "hybrid"):
            assert searched(flt, mode) == want, (flt, mode)


def test_filtered_search_over_many_entries_finds_the_rare_match(mm):
    items = [(f"common words in note {i}", {"kind": "rare" if i == 333 else "common"}) for i in range(600)]
    ids = [r["id"] for r in mm.add_many("agent", items)]
    for mode in ("embedding", "hybrid"):
        hits = mm.search("agent", "something unrelated", k=5, filter={"kind": "rare"}, mode=mode)["hits"]
        assert [h["id"] for h in hits] == [ids[333]]
    hits = mm.search("agent", "common words", k=50, filter={"kind": "common"}, mode="embedding")["hits"]
    assert len(hits) == 50 and ids[333] not in {h["id"] for h in hits}


def test_keyword_query_syntax_is_inert(mm):
    entry = mm.add("agent", 'weird "quotes" AND OR NOT NEAR(x y) * ^ col:value')["id"]
    for query in ['"', 'AND', 'NEAR(', 'col:value', '*', '"quotes" OR', '!!!', "the and of"]:
        mm.search("agent", query, mode="keyword")
        mm.search("agent", query)
    assert mm.search("agent", "quotes NEAR", mode="keyword")["hits"][0]["id"] == entry
    assert mm.search("agent", "the and of", mode="keyword")["hits"] == []  # stopwords only


# ------------------------------------------------------------------------------------------ threads

def test_threads_adding_and_searching_at_once(mm):
    errors, added = [], {}

    def worker(n):
        try:
            mine = []
            for i in range(30):
                mine.append(mm.add(f"ns{n % 2}", f"worker {n} note {i} about topic {i % 5}", {"w": n})["id"])
                mm.search(f"ns{(n + 1) % 2}", f"topic {i % 5}", k=3)
                if i % 10 == 9:
                    mm.delete(f"ns{n % 2}", mine.pop(0))
                    mm.get(f"ns{n % 2}", mine[-1])
            added[n] = mine
        except Exception as e:  # noqa: BLE001 -- collected and reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for ns in (0, 1):
        want = sorted(i for n, ids in added.items() if n % 2 == ns for i in ids)
        assert [e["id"] for e in mm.list(f"ns{ns}", limit=1000)["entries"]] == want
        assert mm.usage(f"ns{ns}")["entries"] == len(want) == 3 * 27
        hits = mm.search(f"ns{ns}", "note", k=100, mode="embedding")["hits"]
        assert sorted(h["id"] for h in hits) == want


# ------------------------------------------------------------------------------------------ the real embedder

DISTRACTORS = [
    "The user is vegetarian and allergic to peanuts.",
    "Ticket INC-4821: login page returns HTTP 502 when the auth service restarts.",
    "TODO: renew the TLS certificate for api.example.com before it expires on April 2.",
    "Research: BM25 ranks documents by term frequency saturation and inverse document frequency.",
    "The quarterly revenue for Q3 was 4.2 million dollars, up 12 percent year over year.",
    "The cat's name is Pixel and she needs her medication twice a day.",
    "The user runs 5 kilometres every morning before work.",
    "Budget for the offsite event is capped at 15,000 euros including travel.",
    "Kubernetes pod crash loops were caused by a missing environment variable DATABASE_URL.",
    "The user's sister Lena lives in Vancouver and works as a nurse.",
    "The printer on the third floor jams when using recycled paper.",
    "Remember: the user's son Theo starts kindergarten in September.",
]


def test_wordllama_finds_a_paraphrase_first(tmp_path):
    embedder = WordLlamaEmbedder()
    vectors = embedder.embed(["hello world", "", "x" * 5000])
    assert vectors.dtype == np.float32 and vectors.shape == (3, 256)
    assert np.allclose(np.linalg.norm(vectors[[0, 2]], axis=1), 1.0, atol=1e-5)
    m = MemoryManager(tmp_path / "memory.db", embedder=embedder)
    m.add_many("agent", [(t, None) for t in DISTRACTORS[:6]])
    planted = m.add("agent", "Dentist appointment on Tuesday at 3pm at Smile Dental on Oak Street.")["id"]
    m.add_many("agent", [(t, None) for t in DISTRACTORS[6:]])
    for mode in ("embedding", "hybrid"):  # no word in common with the entry
        assert m.search("agent", "when to see the tooth doctor", mode=mode)["hits"][0]["id"] == planted, mode
    m.close()
