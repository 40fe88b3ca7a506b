"""The memory manager's benchmark (kernel/memory.py; figures go to docs/memory.md and bench/results.json).

1. Retrieval quality: bench/memory_eval.json (hand-labelled) in a fresh manager with the real embedder;
   recall@5 and MRR@10 per mode (``embedding``, ``keyword``, ``hybrid``) and per query type, and for each
   hybrid fusion (reciprocal rank; min-max weighted sums).
2. Search latency with one namespace of 10k, then 100k synthetic entries: p50/p99 ms per mode, with the
   query's embedding included and excluded (a cache in front of the embedder, warmed beforehand).
3. The embedder's throughput (texts/s for ~100-word texts) and single-query latency; the write-through
   ``add`` latency; how much a prefix tree could save (the paper's compression) on the eval set and on
   agent-log-like text.

``python -m bench.memory`` (or ``python -m bench memory``); about two minutes on 2 cores.
"""
from __future__ import annotations

import os
import sys

# Before numpy loads: one BLAS thread (docs/memory.md: more only add scheduling delay to a memory-bound
# product).  Too late if something imported numpy first (``python -m bench`` running every benchmark);
# main() prints which it got.
BLAS_PINNED = "numpy" not in sys.modules and "OPENBLAS_NUM_THREADS" not in os.environ
if BLAS_PINNED:
    os.environ["OPENBLAS_NUM_THREADS"] = "1"

import json  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from bench.common import pct, save
from kernel.embed import WordLlamaEmbedder
from kernel.memory import MemoryManager

EVAL = Path(__file__).resolve().parent / "memory_eval.json"
SIZES = (10_000, 100_000)
N_QUERIES = 200
FILL_BATCH = 2000


def cpu_model() -> str:
    """lscpu's model name and the number of CPUs this process may use."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = "unknown"
    return f"{name}, {len(os.sched_getaffinity(0))} CPUs"


class CachedEmbedder:
    """The wrapped embedder with a memo of its vectors: a warmed cache takes the query's embedding out of a
    search's time."""

    def __init__(self, inner):
        self.inner, self.name, self.dim = inner, inner.name, inner.dim
        self.memo: dict[str, np.ndarray] = {}

    def embed(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if missing:
            self.memo.update(zip(missing, self.inner.embed(missing)))
        return np.stack([self.memo[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)


def retrieval_quality(embedder, tmp: Path, modes=("embedding", "keyword", "hybrid"), **manager_kwargs) -> dict:
    """Mean recall@5 and MRR@10 on the eval set for each of ``modes``, overall and by query type."""
    data = json.loads(EVAL.read_text())
    mm = MemoryManager(tmp / f"eval-{time.monotonic_ns()}.db", embedder=embedder, **manager_kwargs)
    ids = [r["id"] for r in mm.add_many("eval", [(e["text"], e["metadata"]) for e in data["entries"]])]
    out = {}
    for mode in modes:
        recall: dict[str, list[float]] = {}
        mrr: dict[str, list[float]] = {}
        for q in data["queries"]:
            got = [h["id"] for h in mm.search("eval", q["query"], 10, mode=mode)["hits"]]
            want = {ids[i] for i in q["relevant"]}
            recall.setdefault(q["type"], []).append(len(set(got[:5]) & want) / len(want))
            mrr.setdefault(q["type"], []).append(next((1 / r for r, i in enumerate(got, 1) if i in want), 0.0))
        out[mode] = {"recall_at_5": _means(recall), "mrr_at_10": _means(mrr)}
    mm.close()
    return out


def _means(by_type: dict[str, list[float]]) -> dict:
    every = [v for vs in by_type.values() for v in vs]
    return {"all": round(sum(every) / len(every), 3),
            **{t: round(sum(vs) / len(vs), 3) for t, vs in sorted(by_type.items())}}


KINDS = {"fact": "Fact:", "todo": "TODO:", "note": "Note:", "observation": "Observation:", "result": "Result:"}
WORST_QUERY = "observation"  # the word in a fifth of the synthetic entries: the keyword score's worst case


def synthetic(rng: random.Random, vocab: list[str], n: int) -> list[tuple[str, dict]]:
    """``n`` agent-note-like entries: a kind's prefix ("TODO:", ...) and 15..60 words from ``vocab``, one in
    seven with a ticket-like code."""
    out = []
    for i in range(n):
        kind = list(KINDS)[i % len(KINDS)]
        words = rng.choices(vocab, k=rng.randint(15, 60))
        if i % 7 == 0:
            words.insert(rng.randrange(len(words)), f"SYN-{rng.randrange(100000)}")
        out.append((f"{KINDS[kind]} {' '.join(words)}", {"kind": kind, "n": i}))
    return out


def latency(mm: MemoryManager, cache: CachedEmbedder, queries: list[str]) -> dict:
    """search p50/p99 ms per mode: with the query's embedding ("incl") and with it cached ("excl")."""
    out = {}
    for mode in ("hybrid", "embedding", "keyword"):
        for label in ("incl", "excl") if mode != "keyword" else ("excl",):
            times = []
            for q in queries:
                if label == "incl":
                    cache.memo.pop(q, None)
                else:
                    cache.embed([q])
                t = time.perf_counter()
                mm.search("bench", q, 5, mode=mode)
                times.append((time.perf_counter() - t) * 1e3)
            out[f"{mode}_{label}"] = {"p50_ms": round(pct(times, 50), 2), "p99_ms": round(pct(times, 99), 2)}
    filtered = []
    for q in queries[:50]:
        t = time.perf_counter()
        mm.search("bench", q, 5, filter={"kind": "todo"})
        filtered.append((time.perf_counter() - t) * 1e3)
    out["hybrid_filter_1_in_5_excl"] = {"p50_ms": round(pct(filtered, 50), 2), "p99_ms": round(pct(filtered, 99), 2)}
    worst = []
    for _ in range(20):
        t = time.perf_counter()
        mm.search("bench", WORST_QUERY, 5, mode="keyword")
        worst.append((time.perf_counter() - t) * 1e3)
    out["keyword_word_in_1_of_5"] = {"p50_ms": round(pct(worst, 50), 2), "p99_ms": round(pct(worst, 99), 2)}
    return out


def embedder_throughput(embedder, rng: random.Random, vocab: list[str]) -> dict:
    texts = [" ".join(rng.choices(vocab, k=100)) for _ in range(2000)]
    embedder.embed(texts[:10])
    best = min(_timed(lambda: embedder.embed(texts)) for _ in range(3))
    single = [_timed(lambda: embedder.embed(["where does the user like to eat lunch on fridays?"])) * 1e3
              for _ in range(200)]
    return {"texts_per_s_100_words": round(len(texts) / best), "query_p50_ms": round(pct(single, 50), 3)}


def _by_type(means: dict) -> str:
    return ", ".join(f"{t} {v:.2f}" for t, v in means.items() if t != "all")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def prefix_saving(texts: list[str]) -> dict:
    """What prefix sharing (the paper's prefix tree) could save on ``texts`` and what it costs in Python:
    ``shared_prefix_bytes`` is the most any prefix scheme saves (each text's common prefix with its neighbour
    in sorted order, the sum of a trie's shared edges) of ``bytes`` (UTF-8); ``ram_*`` are the bytes Python
    allocates (tracemalloc) to hold the texts as plain strs (what the cache does), front-coded (sorted,
    (shared length, suffix) per text: the cheapest prefix scheme), and in a radix trie."""
    raw = sorted(t.encode() for t in texts)
    shared = sum(_common_prefix(a, b) for a, b in zip(raw, raw[1:]))
    total = sum(map(len, raw))
    ram = {}
    for label, build in (("plain", _plain), ("front_coded", _front_coded), ("radix_trie", _radix_trie)):
        tracemalloc.start()
        held = build(texts)
        ram[f"ram_{label}"] = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del held
    return {"bytes": total, "shared_prefix_bytes": shared, "saving_pct": round(100 * shared / total, 2), **ram}


def _common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _copy(text: str) -> str:
    return text.encode().decode()  # a new str object, so tracemalloc counts it


def _plain(texts: list[str]) -> list:
    return [_copy(t) for t in texts]


def _front_coded(texts: list[str]) -> list:
    out, prev = [], ""
    for t in sorted(texts):
        n = _common_prefix(t, prev)
        out.append((n, _copy(t[n:])))
        prev = t
    return out


class _TrieNode:
    __slots__ = ("edges", "end")

    def __init__(self):
        self.edges: dict[str, list] = {}  # first char -> [edge label, child]
        self.end = False


def _radix_trie(texts: list[str]) -> _TrieNode:
    root = _TrieNode()
    for text in texts:
        node, rest = root, text
        while rest:
            edge = node.edges.get(rest[0])
            if edge is None:
                child = _TrieNode()
                node.edges[rest[0]] = [_copy(rest), child]
                node, rest = child, ""
                break
            label, child = edge
            n = _common_prefix(label, rest)
            if n < len(label):  # split the edge
                mid = _TrieNode()
                mid.edges[label[n]] = [_copy(label[n:]), child]
                edge[0], edge[1] = _copy(label[:n]), mid
                child = mid
            node, rest = child, rest[n:]
        node.end = True
    return root


def agent_log(rng: random.Random, n: int) -> list[str]:
    """Agent-log-like notes, templated on purpose (the case most favourable to prefix sharing)."""
    tools = ["web_search", "read_file", "run_python", "send_email", "calendar.list"]
    templates = [
        "Observation: tool {tool} returned {n} results for query '{w1} {w2}'.",
        "TODO: follow up with {name} about {w1} {w2} by {day}.",
        "User preference: {name} likes {w1} and dislikes {w2}.",
        "Step {n}: called {tool} with argument '{w1}', status ok in {ms} ms.",
        "Fact learned on {day}: {name}'s {w1} is {w2}.",
    ]
    words = ["budget", "report", "coffee", "invoice", "flight", "meeting", "kernel", "paper", "draft", "garden"]
    names = ["Alice", "Bob", "Maya", "Theo", "Lena", "Dr. Okafor"]
    days = ["Monday", "Tuesday", "Friday", "June 14", "March 3"]
    return [rng.choice(templates).format(tool=rng.choice(tools), n=rng.randrange(1000), w1=rng.choice(words),
                                         w2=rng.choice(words), name=rng.choice(names), day=rng.choice(days),
                                         ms=rng.randrange(5000)) for _ in range(n)]


def main() -> dict:
    rng = random.Random(7)
    cpu = cpu_model()
    blas = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    print(f"memory: CPU {cpu}; OPENBLAS_NUM_THREADS={blas}"
          + ("" if BLAS_PINNED or blas != "default" else " (numpy was loaded before bench.memory)"))
    data = json.loads(EVAL.read_text())
    vocab = sorted({w.strip(".,;:'()?") for e in data["entries"] for w in e["text"].split()} - {""})
    embedder = WordLlamaEmbedder()
    t = time.perf_counter()
    embedder.embed(["load"])
    result: dict = {"cpu": cpu, "openblas_threads": blas, "embedder": embedder.name, "embedder_load_s": round(time.perf_counter() - t, 2)}
    with tempfile.TemporaryDirectory(prefix="aiosd-memory-") as tmp_name:
        tmp = Path(tmp_name)
        quality = retrieval_quality(embedder, tmp)
        for mode, q in quality.items():
            print(f"memory: {mode:9} recall@5 {q['recall_at_5']['all']:.3f}  MRR@10 {q['mrr_at_10']['all']:.3f}  "
                  f"(recall@5 by query type: {_by_type(q['recall_at_5'])}; MRR: {_by_type(q['mrr_at_10'])})")
        result["quality"] = quality
        result["recall_at_5"] = {mode: q["recall_at_5"]["all"] for mode, q in quality.items()}
        variants = {"rrf": {"fusion": "rrf"}, **{f"linear_{a}": {"fusion": "linear", "alpha": a}
                                                 for a in (0.5, 0.7, 0.9)}}
        result["hybrid_variants"] = {}
        for label, kwargs in variants.items():
            q = retrieval_quality(embedder, tmp, modes=("hybrid",), **kwargs)["hybrid"]
            result["hybrid_variants"][label] = q
            print(f"memory: hybrid {label:10} recall@5 {q['recall_at_5']['all']:.3f}  MRR@10 {q['mrr_at_10']['all']:.3f}"
                  f"  (MRR: {_by_type(q['mrr_at_10'])})")

        cache = CachedEmbedder(embedder)
        mm = MemoryManager(tmp / "bench.db", embedder=cache)
        queries = [q["query"] for q in data["queries"]]
        queries += [" ".join(rng.choices(vocab, k=rng.randint(3, 8))) for _ in range(N_QUERIES - len(queries))]
        filled = 0
        result["search"] = {}
        for size in SIZES:
            items = synthetic(rng, vocab, size - filled)
            t = time.perf_counter()
            for start in range(0, len(items), FILL_BATCH):
                mm.add_many("bench", items[start:start + FILL_BATCH])
            fill_s = time.perf_counter() - t
            cache.memo.clear()
            filled = size
            lat = latency(mm, cache, queries)
            stats = mm.stats("bench")
            result["search"][str(size)] = {"fill_entries_per_s": round(len(items) / fill_s), **lat,
                                           "resident_entries": stats["resident_entries"],
                                           "vector_mb": round(stats["vector_bytes"] / 2**20, 1)}
            print(f"memory: {size} entries: filled at {len(items) / fill_s:.0f} entries/s; "
                  f"resident {stats['resident_entries']}, vectors {stats['vector_bytes'] / 2**20:.0f} MiB")
            for label, v in lat.items():
                print(f"memory: {size} entries: search {label:27} p50 {v['p50_ms']:6.2f} ms  p99 {v['p99_ms']:6.2f} ms")
        adds = []
        for i in range(100):
            t = time.perf_counter()
            mm.add("writes", f"note number {i}: the agent wrote this down", {"i": i})
            adds.append((time.perf_counter() - t) * 1e3)
        result["add_one_ms"] = {"p50_ms": round(pct(adds, 50), 2), "p99_ms": round(pct(adds, 99), 2)}
        print(f"memory: add (write-through, fsync) p50 {pct(adds, 50):.2f} ms  p99 {pct(adds, 99):.2f} ms")
        mm.close()

    result["embedder_throughput"] = embedder_throughput(embedder, rng, vocab)
    print(f"memory: embedder {result['embedder_throughput']['texts_per_s_100_words']} texts/s (100 words), "
          f"one query {result['embedder_throughput']['query_p50_ms']} ms, load {result['embedder_load_s']} s")
    result["prefix_tree"] = {"eval_set": prefix_saving([e["text"] for e in data["entries"]]),
                             "agent_log_10k": prefix_saving(agent_log(rng, 10_000))}
    for label, v in result["prefix_tree"].items():
        print(f"memory: prefix sharing on {label}: at most {v['shared_prefix_bytes']} of {v['bytes']} text bytes "
              f"({v['saving_pct']}%); Python RAM: plain strs {v['ram_plain']}, front-coded {v['ram_front_coded']}, "
              f"radix trie {v['ram_radix_trie']} bytes")
    save("memory", result)
    return result


if __name__ == "__main__":
    main()
