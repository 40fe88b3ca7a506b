"""Fuzzing the ABI from inside an agent (docs/sandbox.md, "Threat model": crash the kernel with one syscall).

A sandboxed fuzzer sends random bytes, truncated and bit-flipped msgpack, broken envelopes, frames near
``max_frame``, values nested thousands deep, and every syscall with random arguments, random sampling
parameters and random JSON schemas (bench/fuzzgen.py).  The kernel must answer every frame it can attribute,
never with ``EIO``, never crash, and not grow; a neighbour must be unharmed.  ``make bench`` runs the same for
120k frames after a 20k warm-up (bench/fuzz.py).
"""
from __future__ import annotations

import pytest

from bench import fuzzgen
from bench.fuzz import fuzz
from syscalls.table import TABLE

pytestmark = pytest.mark.timeout(420)

FRAMES = 10_000  # per round: a warm-up round, then a measured one
RSS_GROWTH_MB = 24  # allowed growth of the kernel's RSS over the measured round


def test_the_generator_knows_every_syscall():
    assert set(fuzzgen.SYSCALLS) == set(TABLE), "bench/fuzzgen.py SYSCALLS must list syscalls/table.py's TABLE"


def test_the_generator_is_seeded_and_stays_under_the_hard_limit():
    a, b = fuzzgen.Frames(3, 4096, 1), fuzzgen.Frames(3, 4096, 1)
    frames = [a.next() for _ in range(2000)]
    assert frames == [b.next() for _ in range(2000)]
    assert max(len(f) for _, _, f in frames) < 2 * 4096
    assert {kind for kind, _, _ in frames} == set(fuzzgen.KINDS)


def test_random_frames_never_crash_the_kernel_nor_get_eio(kernel, neighbour):
    """The first round warms the kernel up (the embedder, compute buffers for new batch shapes, grammar
    caches, SQLite pages: measured, the RSS climbs ~60 MiB over the first ~14k frames, then stays flat); the
    second must not grow it."""
    for seed, warmup in ((11, 0.1), (12, 0.0)):
        result = fuzz(kernel, FRAMES, seed=seed, timeout=300, warmup=warmup)
        assert result["sent"] == FRAMES, result
        assert result["eio"] == 0, result["eio_samples"]
        assert result["malformed"] == 0, result
        # Every frame with a readable id is answered; ids garbled in flight may go unanswered, nothing else.
        assert result["answered"] >= 0.5 * FRAMES, result
    assert result["rss_end_mb"] - result["rss_warm_mb"] < RSS_GROWTH_MB, result["rss_curve"]
    neighbour.assert_unharmed()
