"""Swap: evicting a sequence's KV cache out of the llama context and restoring it exactly.

A sequence the scheduler leaves out of a step is *preempted*: it keeps its sequence slot and its KV cells and
costs nothing but memory.  When the engine needs its slot or its cells, it is *evicted*:
``llama_state_seq_get_data`` copies the sequence's KV (every layer's K and V rows plus each cell's position)
into a snapshot and ``llama_memory_seq_rm`` frees the cells.  Snapshots live in RAM up to ``ram_budget``
bytes; past it they spill to files in ``swap_dir`` (mode 0600, in the kernel's 0700 runtime dir: they hold an
agent's context) up to ``disk_budget`` bytes.  *Resuming* restores a snapshot with ``llama_state_seq_set_data``
into whatever slot is free; the saved cells come back bit for bit, so a generation evicted and resumed any
number of times continues exactly as if it had never stopped (the engine keeps the request's sampler chain,
and with it its RNG state, alive meanwhile).  It costs ~2 ms per 1,000 tokens each way, against seconds to
recompute them.

One limit, llama.cpp's: a sequence's snapshot leaves out the sliding-window layers' cells that its next token
can no longer see (positions more than ``n_swa`` = 512 behind, for Gemma 3).  Continuing the sequence needs
none of them, but the restored cache is then smaller than the live one was, the attention kernels run on a
different shape, and the logits round differently (by up to ~1.5 measured, as with batching: see
kernel/llm/engine.py).  So a resumed sequence is bit-identical to an uninterrupted one while it is within the
window, and equal to it like a batched one beyond (identical wherever the top choice is clear).  For the same
reason the engine reuses a prefix of a restored sequence only where the first new token's window stays above
the cells that were left out.

When a snapshot cannot be taken (a core whose memory cannot be saved per sequence, ``[llm] snapshots =
false``, or both budgets full) the engine falls back to *text*: it keeps the sequence's tokens, which it always
has, and recomputes their KV on resume, as a cold prompt.  That is correct but not bit-exact: a prompt
prefilled in one batch rounds differently from the same tokens decoded one by one (kernel/llm/engine.py's
docstring).

Snapshots of idle sessions (a finished conversation kept for its next turn) are *droppable*: they are kept in
RAM only, and dropped, oldest first, to make room for a running request's snapshot.  All methods are for the
engine thread (they touch the llama context); ``stats`` may be read from any thread.
"""
from __future__ import annotations

import ctypes
import itertools
import logging
import os
import time

import llama_cpp

log = logging.getLogger(__name__)

MB = 1 << 20


class Snapshot:
    """One evicted sequence's KV: ``n_tokens`` cells, ``size`` bytes, in RAM (``data``) or a file (``path``).
    ``dropped`` becomes True when the store dropped a droppable snapshot to make room."""

    __slots__ = ("n_tokens", "size", "data", "path", "droppable", "dropped", "stamp")

    def __init__(self, n_tokens: int, size: int, data, droppable: bool):
        self.n_tokens = n_tokens
        self.size = size
        self.data = data  # a ctypes byte array, or None once on disk
        self.path: str | None = None
        self.droppable = droppable
        self.dropped = False
        self.stamp = time.monotonic()

    @property
    def where(self) -> str:
        return "dropped" if self.dropped else ("disk" if self.path else "ram")

    def __repr__(self) -> str:
        return f"<Snapshot {self.n_tokens}t {self.size // 1024} KiB {self.where}>"


class Swap:
    """Evicts and restores sequences of one llama context (``attach`` it first): the engine's swap space."""

    def __init__(self, *, ram_budget: int = 512 * MB, disk_budget: int = 2048 * MB, swap_dir: str | None = None,
                 enabled: bool = True):
        self.ram_budget = max(0, ram_budget)
        self.disk_budget = max(0, disk_budget) if swap_dir else 0
        self.swap_dir = str(swap_dir) if swap_dir else None
        self.enabled = enabled
        self._ctx = None
        self._mem = None
        self._ram: list[Snapshot] = []  # in RAM, oldest first
        self._disk: set[Snapshot] = set()
        self._names = itertools.count(1)
        self.counts = {"evictions": 0, "session_evictions": 0, "snapshots_ram": 0, "snapshots_disk": 0,
                       "text_evictions": 0, "restores": 0, "restore_failures": 0, "dropped": 0,
                       "spill_failures": 0}
        self.ram_used = 0
        self.disk_used = 0

    def attach(self, ctx, mem) -> None:
        """Use llama context ``ctx`` (and its memory ``mem``); prepare the swap dir."""
        self._ctx, self._mem = ctx, mem
        if self.swap_dir and self.disk_budget:
            os.makedirs(self.swap_dir, mode=0o700, exist_ok=True)
            for name in os.listdir(self.swap_dir):  # a previous kernel's snapshots are meaningless now
                if name.endswith(".kv"):
                    try:
                        os.unlink(os.path.join(self.swap_dir, name))
                    except OSError:
                        pass

    # ---- evict / restore ----------------------------------------------------------------------------

    def evict(self, seq_id: int, n_tokens: int, *, droppable: bool = False) -> Snapshot | None:
        """Snapshot sequence ``seq_id`` (holding ``n_tokens`` cells) and free its KV cells.

        Returns the snapshot, or None when none could be kept (snapshots disabled or unsupported, budgets
        full, or a droppable snapshot that does not fit in RAM): the cells are freed all the same, and the
        caller recomputes them from its tokens on resume (the text fallback).
        """
        snap = None
        try:
            if self.enabled and n_tokens > 0:
                snap = self._take(seq_id, n_tokens, droppable)
        except Exception:
            log.exception("swap: snapshot of sequence %d failed; falling back to recomputation", seq_id)
            snap = None
        llama_cpp.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
        if droppable:
            self.counts["session_evictions"] += 1
        else:
            self.counts["evictions"] += 1
            self.counts["text_evictions"] += snap is None
        return snap

    def restore(self, snap: Snapshot, seq_id: int) -> bool:
        """Put ``snap`` back as sequence ``seq_id`` (which must be empty) and forget the snapshot.  True when
        the cells are back exactly; False when it failed (the sequence is left empty: recompute it)."""
        ok = False
        try:
            if not snap.dropped:
                data = snap.data if snap.path is None else self._read(snap)
                n = llama_cpp.llama_state_seq_set_data(self._ctx, data, snap.size, seq_id)
                ok = n == snap.size
        except Exception:
            log.exception("swap: restoring a snapshot into sequence %d failed", seq_id)
        if not ok:
            llama_cpp.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
            self.counts["restore_failures"] += 1
        else:
            self.counts["restores"] += 1
        self.discard(snap)
        return ok

    def discard(self, snap: Snapshot) -> None:
        """Forget ``snap`` (its RAM or file is released).  Idempotent."""
        if snap.data is not None:
            snap.data = None
            self.ram_used -= snap.size
            try:
                self._ram.remove(snap)
            except ValueError:
                pass
        if snap.path is not None:
            try:
                os.unlink(snap.path)
            except OSError:
                pass
            snap.path = None
            self.disk_used -= snap.size
            self._disk.discard(snap)

    def clear(self) -> None:
        """Forget every snapshot (engine shutdown)."""
        for snap in list(self._ram) + list(self._disk):
            self.discard(snap)

    def stats(self) -> dict:
        return dict(self.counts, swap_ram_bytes=self.ram_used, swap_disk_bytes=self.disk_used)

    # ---- internals ----------------------------------------------------------------------------------

    def _take(self, seq_id: int, n_tokens: int, droppable: bool) -> Snapshot | None:
        size = llama_cpp.llama_state_seq_get_size(self._ctx, seq_id)
        if size <= 0:
            return None  # this core cannot save a sequence: text fallback
        in_ram = self._make_room(size, droppable)
        if not in_ram and (droppable or self.disk_used + size > self.disk_budget):
            return None
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(self._ctx, buf, size, seq_id)
        if n != size:
            log.warning("swap: sequence %d saved %d of %d bytes; not keeping it", seq_id, n, size)
            return None
        snap = Snapshot(n_tokens, size, buf, droppable)
        if in_ram:
            self._ram.append(snap)
            self.ram_used += size
            self.counts["snapshots_ram"] += 1
        else:
            try:
                self._spill(snap)
            except OSError as exc:  # a full or failing disk (ENOSPC, EFBIG, EIO): recompute this one instead
                self.counts["spill_failures"] += 1
                if self.counts["spill_failures"] == 1:  # once: the counter in stats() tells the rest
                    log.warning("swap: cannot spill a snapshot to %s (%s); evictions that do not fit in RAM "
                                "are recomputed from their tokens", self.swap_dir, exc.strerror or exc)
                return None
        return snap

    def _make_room(self, size: int, droppable: bool) -> bool:
        """True when ``size`` more bytes fit the RAM budget, dropping droppable snapshots (oldest first) for a
        snapshot that is not droppable itself."""
        if self.ram_used + size <= self.ram_budget:
            return True
        if droppable:
            return False
        for old in [s for s in self._ram if s.droppable]:
            if self.ram_used + size <= self.ram_budget:
                break
            old.dropped = True
            self.counts["dropped"] += 1
            self.discard(old)
        return self.ram_used + size <= self.ram_budget

    def _spill(self, snap: Snapshot) -> None:
        path = os.path.join(self.swap_dir, f"{os.getpid()}-{next(self._names)}.kv")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(memoryview(snap.data))
        except BaseException:
            try:
                os.unlink(path)
            except OSError:
                pass
            raise
        snap.data = None
        snap.path = path
        self._disk.add(snap)
        self.disk_used += snap.size
        self.counts["snapshots_disk"] += 1

    def _read(self, snap: Snapshot):
        buf = (ctypes.c_uint8 * snap.size)()
        with open(snap.path, "rb") as f:
            if f.readinto(memoryview(buf)) != snap.size:
                raise OSError(f"snapshot file {snap.path} is truncated")
        return buf
