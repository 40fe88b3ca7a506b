"""Slots and KV residency (llama.cpp's server slots): which sequence holds which llama sequence id and KV cells,
prefix reuse, and eviction to make room.  Mechanism only: the scheduler (kernel/llm/scheduler.py) says who runs,
this module makes them resident, and swap (kernel/llm/swap.py) keeps what is evicted.

Slots and memory.  The context has ``n_seq_max`` sequence slots sharing one KV pool of ``kv_size`` cells
(``kv_unified``), or each with a stream of its own.  A slot is *busy* (a pending request's sequence: running, or
preempted and left out of the batch), *cached* (an idle session: the KV of a finished generation, kept so that
the owner's next request that starts with the same tokens, e.g. the next turn of a chat, only computes what is
new), or free.  A request is admitted only when a slot and enough cells for its known tokens are free;
otherwise cached sessions (oldest first) and preempted sequences (least recently run first) are evicted to
make room, and if nothing can be evicted the request waits in the scheduler -- queued, never dropped.  Gemma
3's sliding-window layers keep a full-size cache (``swa_full``) so that a sequence can be cut back to a prefix.

Prefix reuse.  A new request's prompt is matched against the KV the engine holds for the *same owner*
(cached sessions, running sequences, evicted sessions): the longest common prefix, at least ``MIN_REUSE``
tokens and never the last prompt token (its logits are needed), is reused -- taken over from a cached slot,
copied from a busy one with ``llama_memory_seq_cp`` (in a unified cache only metadata: the cells are shared),
or restored from a snapshot -- and ``usage.cached_tokens`` reports how many prompt tokens were not recomputed.
Reuse is per owner by default because it is a timing side channel: an agent whose prompt is answered faster
learns that someone else's prompt began the same way.  A *scope* (a privilege group, a fleet) widens it to the
owners of that scope, and ``share_prefix=True`` to every owner (docs/engine.md, "Prefix sharing").

Everything here is for the engine thread only, except ``counts``, which any thread may read.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import llama_cpp

from kernel.llm.request import Request
from kernel.llm.swap import Snapshot, Swap
from kernel.llm.text import Detokenizer

MIN_REUSE = 8  # a cached prefix shorter than this is recomputed rather than reused
SESSIONS_PER_OWNER = 4  # evicted idle sessions kept per owner (their snapshots share the swap budget)


@dataclass(eq=False)
class Seq:
    """A started request's state inside the engine thread (only that thread touches it).

    ``tokens`` is everything that must be in the KV cache before the next sample: the prompt, then every
    generated token fed back.  The cache holds ``tokens[:n_past]`` while the sequence is resident (``slot``), and
    its snapshot holds as much while it is evicted (``snapshot``; None after a text eviction, which sets
    ``n_past`` to 0 so that everything is recomputed).  A decoding sequence has exactly one token left to feed.
    """

    req: Request
    sampler: object  # its llama_sampler chain (C pointer); kept across eviction, with its RNG state
    grammar: object  # its grammar sampler (C pointer) or None
    text: Detokenizer
    tokens: list[int]
    n_past: int = 0
    n_generated: int = 0  # completion tokens so far (an EOG token is not counted)
    n_cached: int = 0  # prompt tokens whose KV was reused instead of computed
    complete_from: int = 0  # sliding-window layers hold no cells below this position (see Slots.restored)
    slot: "Slot | None" = None
    snapshot: Snapshot | None = None
    last_ran: int = 0  # the step it last ran in
    turn: int = 0  # tokens sampled since it last became resident
    n_queued: int = 0  # tokens of this sequence in the current batch
    row: int = -1  # batch row whose logits to sample this step; -1: nothing to sample


@dataclass(eq=False)
class Slot:
    """One llama sequence id.  Busy (``seq``), cached (``cache``: the tokens of an idle session's KV) or free."""

    seq_id: int
    seq: Seq | None = None
    cache: list[int] | None = None
    owner: object = None  # the cached session's owner
    stamp: float = 0.0  # when the cached session was last used
    complete_from: int = 0  # the cached session's sliding-window floor (see Slots.restored)

    @property
    def free(self) -> bool:
        return self.seq is None and self.cache is None

    @property
    def cells(self) -> int:
        """KV cells this slot holds (cells shared with another slot are counted by both)."""
        if self.seq is not None:
            return self.seq.n_past
        return len(self.cache) if self.cache is not None else 0

    def kv_tokens(self) -> list[int]:
        return self.seq.tokens[: self.seq.n_past] if self.seq is not None else (self.cache or [])

    def floor(self) -> int:
        return self.seq.complete_from if self.seq is not None else self.complete_from


@dataclass(eq=False)
class Session:
    """An idle session evicted from its slot: its tokens and their snapshot (droppable)."""

    owner: object
    tokens: list[int]
    snapshot: Snapshot
    complete_from: int = 0


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists (list slices compare in C)."""
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:
        return 0
    if a[:n] == b[:n]:
        return n
    lo, hi = 1, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class Slots:
    """The slots of one llama context and the idle sessions evicted from them.

    ``slots``: ``n_seq_max`` of them; ``sessions``: evicted idle sessions, oldest first; ``swap`` keeps
    snapshots.  ``scopes`` (owner -> prefix-sharing scope) is the engine's dict, written under its lock by
    submitting threads (one lookup is atomic).  ``counts``: ``cached_tokens`` and ``prefix_hits``.
    """

    def __init__(self, n_seq_max: int, kv_size: int, swap: Swap, *, kv_unified: bool, share_prefix: bool,
                 scopes: dict):
        self.slots = [Slot(i) for i in range(n_seq_max)]
        self.sessions: list[Session] = []
        self.swap = swap
        self.kv_size = kv_size
        self.kv_unified = kv_unified
        self.share_prefix = share_prefix
        self.scopes = scopes
        self.counts = {"cached_tokens": 0, "prefix_hits": 0}
        self._mem = None
        self._n_swa = 0

    def attach(self, mem, n_swa: int) -> None:
        """Use llama memory ``mem`` of a model whose sliding window is ``n_swa`` tokens (0: none)."""
        self._mem, self._n_swa = mem, n_swa

    # ---- what the engine asks ------------------------------------------------------------------------------

    def kv_used(self) -> int:
        """KV cells held by all slots (prefix cells shared with ``seq_cp`` counted by each)."""
        return sum(slot.cells for slot in self.slots)

    def n_busy(self) -> int:
        return sum(s.seq is not None for s in self.slots)

    def n_cached(self) -> int:
        """Idle sessions: in slots, and evicted."""
        return sum(s.cache is not None for s in self.slots) + len(self.sessions)

    def make_resident(self, seq: Seq, plan: list[Seq], wanted: set) -> bool:
        """Give ``seq`` a slot and its KV: restore its snapshot, or reuse a cached prefix and leave the rest to
        prefill.  Evicts what the step does not need (never ``plan``'s slots) to make room; False when it cannot.
        ``wanted``: the requests the scheduler chose for this step (evicted last)."""
        keep = {s.slot for s in plan}
        need = len(seq.tokens) + 1  # cells once its known tokens are in, plus the next one
        if seq.snapshot is not None:
            if not self.free_up(True, max(need, seq.snapshot.n_tokens), keep, wanted):
                return False
            slot = self._attach(seq)
            if self.swap.restore(seq.snapshot, slot.seq_id):
                seq.complete_from = self.restored(seq.complete_from, seq.snapshot.n_tokens)
            else:
                seq.n_past, seq.complete_from = 0, 0  # recompute (the text fallback)
            seq.snapshot = None
            return True
        p, src = self.find_prefix(seq) if seq.n_past == 0 else (0, None)
        if isinstance(src, Slot) and src.cache is not None:  # take over an idle session's slot
            if not self.free_up(False, need - src.cells, keep | {src}, wanted):
                return False
            llama_cpp.llama_memory_seq_rm(self._mem, src.seq_id, p, -1)
            seq.complete_from = src.complete_from
            src.cache = src.owner = None
            self._attach(seq, src)
        elif isinstance(src, Slot):  # share the prefix of a busy sequence
            if not self.free_up(True, need, keep | {src}, wanted):
                return False
            slot = self._attach(seq)
            if self.kv_unified:  # metadata only: the cells are shared
                llama_cpp.llama_memory_seq_cp(self._mem, src.seq_id, slot.seq_id, 0, p)
            else:  # across streams llama.cpp copies a whole stream (~18 KB a cell), then we cut it back
                llama_cpp.llama_memory_seq_cp(self._mem, src.seq_id, slot.seq_id, -1, -1)
                llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, p, -1)
            seq.complete_from = src.floor()
        elif isinstance(src, Session):  # restore an evicted idle session, then cut it back to the prefix
            if not self.free_up(True, max(need, len(src.tokens)), keep, wanted):
                return False
            if src in self.sessions:  # making room may have dropped it (_keep_session)
                self.sessions.remove(src)
            slot = self._attach(seq)
            if src.snapshot.dropped:  # making room dropped it: prefill after all
                p = 0
            elif self.swap.restore(src.snapshot, slot.seq_id):
                llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, p, -1)
                seq.complete_from = self.restored(src.complete_from, len(src.tokens))
            else:
                p = 0
        else:
            if not self.free_up(True, need, keep, wanted):
                return False
            self._attach(seq)
        seq.n_past = p
        if p and seq.n_generated == 0:
            seq.n_cached = p
            self.counts["cached_tokens"] += p
            self.counts["prefix_hits"] += 1
        return True

    def find_prefix(self, seq: Seq) -> tuple[int, object]:
        """The longest prefix of ``seq.tokens`` whose KV this engine holds for the same owner, or an owner of the
        same scope (any owner with ``share_prefix``): ``(length, source)``, source an idle slot, a busy slot or an
        evicted session; ``(0, None)`` below ``MIN_REUSE`` tokens.  Never the whole of ``tokens``: the last one
        must be computed for its logits."""
        limit = len(seq.tokens) - 1
        owner = seq.req.owner
        scopes = self.scopes
        scope = scopes.get(owner)
        best, src = MIN_REUSE - 1, None
        self.sessions = [s for s in self.sessions if not s.snapshot.dropped]
        candidates = [(s, s.owner) for s in self.slots if s.cache is not None]  # cheapest source first
        candidates += [(s, s.seq.req.owner) for s in self.slots if s.seq is not None and s.seq is not seq]
        candidates += [(s, s.owner) for s in self.sessions]
        for cand, cand_owner in candidates:
            if cand_owner != owner and not self.share_prefix and (scope is None or scopes.get(cand_owner) != scope):
                continue
            if isinstance(cand, Session):
                tokens, floor = cand.tokens, self.restored(cand.complete_from, len(cand.tokens))
            else:
                tokens, floor = cand.kv_tokens(), cand.floor()
            p = min(common_prefix(tokens, seq.tokens), limit)
            if floor and p < floor + self._n_swa - 1:
                continue  # the window of the first new token reaches below what the sliding layers hold
            if p > best:
                best, src = p, cand
        return (best, src) if src is not None else (0, None)

    def restored(self, floor: int, n_tokens: int) -> int:
        """The sliding-window floor of a sequence restored from a snapshot of ``n_tokens`` cells.

        llama.cpp saves a sequence without the sliding-window layers' cells that its next token can no longer
        see (positions below ``n_tokens - n_swa``).  Continuing the sequence is exact, but a prefix of it is
        reusable only if the first new token's window stays above that floor: ``p >= floor + n_swa - 1``."""
        return max(floor, n_tokens - self._n_swa) if self._n_swa else 0

    def free_up(self, need_slot: bool, cells: int, keep: set, wanted: set) -> bool:
        """Evict until a slot is free (if ``need_slot``) and ``cells`` more KV cells fit, never touching the
        slots in ``keep``; False when nothing is left to evict."""
        while True:
            if (not need_slot or any(s.free for s in self.slots)) and self.kv_used() + cells <= self.kv_size:
                return True
            victim = self.victim(keep, wanted)
            if victim is None:
                return False
            self.evict(victim)

    def victim(self, keep: set, wanted: set) -> Slot | None:
        """What to evict first: the oldest idle session, then the preempted sequence the scheduler does not want
        now that ran least recently, then one it wants."""
        cached = [s for s in self.slots if s.cache is not None and s not in keep]
        if cached:
            return min(cached, key=lambda s: s.stamp)
        busy = [s for s in self.slots if s.seq is not None and s not in keep]
        if busy:
            return min(busy, key=lambda s: (s.seq.req in wanted, s.seq.last_ran))
        return None

    def evict(self, slot: Slot) -> None:
        """Snapshot a slot's KV (kernel/llm/swap.py) and free the slot."""
        if slot.seq is not None:
            seq = slot.seq
            seq.snapshot = self.swap.evict(slot.seq_id, seq.n_past)
            if seq.snapshot is None:
                seq.n_past = 0  # its tokens are recomputed on resume
            seq.slot = slot.seq = None
        else:
            snap = self.swap.evict(slot.seq_id, len(slot.cache), droppable=True)
            if snap is not None:
                self._keep_session(Session(slot.owner, slot.cache, snap, slot.complete_from))
            slot.cache = slot.owner = None

    def retire(self, seq: Seq, keep: bool) -> None:
        """Release a sequence's slot -- as a cached session of its owner when ``keep``, else freed -- and its
        snapshot."""
        slot = seq.slot
        if slot is not None:
            slot.seq = seq.slot = None
            if keep and seq.n_past >= MIN_REUSE:
                slot.cache, slot.owner, slot.stamp = seq.tokens[: seq.n_past], seq.req.owner, time.monotonic()
                slot.complete_from = seq.complete_from
            else:
                llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
        if seq.snapshot is not None:
            self.swap.discard(seq.snapshot)
            seq.snapshot = None

    def forget(self, owner) -> None:
        """Drop the cached sessions of ``owner`` (an agent that ended), in slots and evicted."""
        for slot in self.slots:
            if slot.cache is not None and slot.owner == owner:
                self._clear_slot(slot)
        for sess in [s for s in self.sessions if s.owner == owner]:
            self.sessions.remove(sess)
            self.swap.discard(sess.snapshot)

    def reset(self) -> None:
        """Empty every slot and forget every session (after a failed step; the caller clears the KV memory and
        fails the started requests)."""
        for slot in self.slots:
            slot.seq = slot.cache = slot.owner = None
        for sess in self.sessions:
            self.swap.discard(sess.snapshot)
        self.sessions.clear()

    # ---- internals -------------------------------------------------------------------------------------

    def _keep_session(self, sess: Session) -> None:
        """Keep an evicted idle session, and at most ``SESSIONS_PER_OWNER`` of its owner's (the oldest go): one
        agent's stream of one-off requests must not fill the swap budget that every agent's sessions share."""
        self.sessions.append(sess)
        mine = [s for s in self.sessions if s.owner == sess.owner]
        for old in mine[:-SESSIONS_PER_OWNER]:
            self.sessions.remove(old)
            old.snapshot.dropped = True  # a request about to restore it (make_resident) prefills instead
            self.swap.discard(old.snapshot)

    def _attach(self, seq: Seq, slot: Slot | None = None) -> Slot:
        slot = slot or next(s for s in self.slots if s.free)
        slot.seq, seq.slot = seq, slot
        seq.turn = 0
        return slot

    def _clear_slot(self, slot: Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
        slot.cache = slot.owner = None
        slot.complete_from = 0
        if slot.seq is not None:
            slot.seq.slot = None
            slot.seq = None
