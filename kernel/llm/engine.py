"""The LLM engine: many generations at once in one llama.cpp context (continuous batching).

Modelled on llama.cpp's ``examples/parallel`` and ``tools/server``.  One engine thread owns the model and the
context (a llama context must only ever be touched from one thread; ctypes releases the GIL while llama.cpp
computes, so the kernel's other threads keep running) and loops (``Engine._step``)::

    take cancellations                  -> free their sequences, report ECANCELED
    ask the scheduler who runs          -> up to max_active pending requests, best first (kernel/llm/scheduler.py)
    make them resident                  -> a sequence slot and KV cells each: reuse a cached prefix, restore an
                                           evicted snapshot, or prefill; evict others to make room (slots.py)
    fill one batch                      -> the next token of every decoding sequence, then prompt chunks
    llama_decode once
    sample each sequence from its row   -> its own C sampler chain (sampling.py); retire finished sequences
    hand the step's events over         -> one call of the sink with all of them

Mechanism lives here: batch, decode, sample, retire.  Which requests run is the scheduler's choice (``fifo``,
``rr``, ``fair``); slots, prefix reuse and eviction are ``slots.py``'s, exact restore ``swap.py``'s.

Batching changes numerics slightly: llama.cpp's CPU kernels choose their algorithm by the shape of a batch
(e.g. >= 8 tokens, >= 64 tokens, a lone token over >= 512 KV cells), and the algorithms round differently:
measured on Gemma 3 270M, a sequence's logits move by up to ~2 depending on what it shares a batch with.  So
a greedy generation equals its solo run token for token only while the top choice wins by a clear margin;
16 concurrent 64-token essays matched their solo runs in 1-2 of 16 cases (and the same concurrent workload
can differ from run to run: submission timing decides who shares a batch).  The same holds for a prompt whose
prefix came from the cache (its remaining tokens are prefilled in a smaller batch) and for a sequence resumed
by recomputation (the text fallback).  Where the cells themselves are concerned the engine is exact: a
snapshot restores them bit for bit, and the request keeps its sampler chain (and its RNG) across eviction, so
a generation evicted and resumed under the same batch shapes continues exactly as it would have -- within the
sliding window (512 tokens); beyond it llama.cpp's snapshot omits the cells the window has left behind, the
restored cache has a different shape, and the same caveat applies (kernel/llm/swap.py).  Weights are
not repacked (``use_extra_bufts = False``): the repacked Q4_K kernels add one more such switch (at 4 rows) and
were slower here (35 vs 133 tok/s for 32 sequences).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

import llama_cpp

from kernel.llm.model import Model, chat_messages
from kernel.llm.request import (DEFAULT_MODEL, DONE, RUNNING, Cancellable, EngineError, Request, SamplingParams,
                                check_params, next_request_id, usage_so_far)
from kernel.llm.sampling import Sampler, free_samplers, make_samplers, schema_grammar
from kernel.llm.scheduler import FifoScheduler, Scheduler, make_scheduler
from kernel.llm.slots import Seq, Slots
from kernel.llm.swap import MB, Swap
from kernel.llm.text import Detokenizer

log = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 64  # prompt tokens a step may carry while other sequences are decoding
DEFAULT_TOKEN_S = 0.002  # engine seconds a batch token is assumed to cost until a step has been measured

Event = tuple  # (request, kind, payload)
Sink = Callable[[list], None]  # called with one step's events: [(request, kind, payload), ...]


class Prepared:
    """A request ``Engine.prepare`` made ready: its tokens, a private copy of its params, its C samplers, and the
    CPU seconds preparing cost.  Hand it to ``Engine.enqueue`` (which takes the samplers) or ``free`` it."""

    __slots__ = ("engine", "tokens", "params", "sampler", "grammar", "cost_s")

    def __init__(self, engine, tokens: list[int], params: SamplingParams, sampler, grammar, cost_s: float):
        self.engine, self.tokens, self.params = engine, tokens, params
        self.sampler, self.grammar, self.cost_s = sampler, grammar, cost_s

    def free(self) -> None:
        """Drop it unqueued (idempotent).  After its engine has freed the model the samplers are only let go:
        the process is shutting down."""
        with self.engine._model_lock:
            if self.engine._model.loaded:
                free_samplers(self.sampler, self.grammar)
        self.sampler = self.grammar = None


class Engine(Cancellable):
    """The model and its sequences.  ``start`` loads; ``submit`` queues a generation whose events go to ``sink``.

    Every public method is thread-safe and never blocks on generation.  ``sink(events)`` is called from the
    engine thread once a step, with that step's events in order, and must be cheap.  An event is
    ``(request, kind, payload)``:

    - ``"chunk"``, ``{"text": str}``: only when ``request.stream``, only non-empty text;
    - ``"done"``, ``{"text", "finish_reason": "stop"|"length", "usage": {"prompt_tokens", "completion_tokens",
      "cached_tokens"}}``;
    - ``"error"``, an ``EngineError`` (``ECANCELED`` after cancel or close, ``EIO`` when decoding failed) whose
      ``usage`` holds what the request computed before it ended (same keys as ``done``'s; zeros if it never
      started), so that cancelled and failed work can be charged.

    Exactly one of done/error per request, always its last event.

    Sizes: ``n_seq_max`` sequence slots (running + preempted + cached sessions, at most 256); ``max_active``
    sequences per step (default: all slots; ``n_batch`` must be at least this); ``kv_size`` KV cells in all
    (default ``n_ctx_seq * max_active``; at least ``n_ctx_seq``); ``n_ctx_seq`` tokens per sequence (prompt +
    output).  ``scheduler``: a ``kernel.llm.scheduler.Scheduler`` or its name (default FIFO).  Eviction:
    snapshots in RAM up to ``swap_ram_mb``, then in ``swap_dir`` up to ``swap_disk_mb``; ``snapshots=False``
    always recomputes.  ``session_cache=False`` frees a finished request's KV instead of keeping it for its
    owner's next request.  ``prefill_chunk``: prompt tokens one step may carry while other sequences decode
    (chunked prefill).

    Service.  The scheduler is charged, per request, the batch tokens it fed each step plus, in tokens of engine
    time (seconds over the measured cost of a batch token), what its grammar-constrained sampling and its
    ``prepare`` cost: an agent pays for the engine time its requests take, not only for their tokens.
    """

    kind = "local"  # llm.models: a model the kernel runs itself (a remote core's is "openai": remote.py)

    def __init__(self, model_path: str, sink: Sink, *, n_ctx_seq: int = 2048, n_seq_max: int = 16,
                 n_threads: int | None = None, n_batch: int = 512, scheduler: Scheduler | str | None = None,
                 max_active: int | None = None, kv_size: int | None = None, rr_slice: int = 32,
                 swap_ram_mb: int = 512, swap_disk_mb: int = 2048, swap_dir: str | None = None,
                 snapshots: bool = True, share_prefix: bool = False, session_cache: bool = True,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, name: str = DEFAULT_MODEL, kv_unified: bool = True):
        if not 1 <= n_seq_max <= 256:
            raise EngineError("EINVAL", f"n_seq_max must be in 1..256 (llama.cpp's limit), got {n_seq_max}")
        if n_ctx_seq < 2:
            raise EngineError("EINVAL", f"n_ctx_seq must be at least 2 tokens, got {n_ctx_seq}")
        max_active = n_seq_max if not max_active else max_active
        if not 1 <= max_active <= n_seq_max:
            raise EngineError("EINVAL", f"max_active must be in 1..n_seq_max ({n_seq_max}), got {max_active}")
        if n_batch < max_active:
            raise EngineError("EINVAL", f"n_batch ({n_batch}) must be >= max_active ({max_active}): every running "
                              "sequence needs a row in each batch")
        if prefill_chunk < 1:
            raise EngineError("EINVAL", f"prefill_chunk must be at least 1 token, got {prefill_chunk}")
        if not kv_unified:  # one KV stream per slot, n_ctx_seq cells each (docs/engine.md, "KV layout")
            kv_size = n_ctx_seq * n_seq_max
        kv_size = kv_size or n_ctx_seq * max_active
        if kv_size < n_ctx_seq:
            raise EngineError("EINVAL", f"kv_size ({kv_size}) must be >= n_ctx_seq ({n_ctx_seq}): one sequence of "
                              "full length must fit")
        if isinstance(scheduler, str):
            try:
                scheduler = make_scheduler(scheduler, rr_slice=rr_slice)
            except ValueError as exc:
                raise EngineError("EINVAL", str(exc)) from None
        self.name = name
        self.model_path = str(model_path)
        self.n_ctx_seq = n_ctx_seq
        self.n_seq_max = n_seq_max
        self.max_active = max_active
        self.kv_size = kv_size
        self.kv_unified = kv_unified
        self.n_batch = n_batch
        self.prefill_chunk = prefill_chunk
        self.n_threads = n_threads or os.cpu_count() or 1
        self.share_prefix = share_prefix
        self.session_cache = session_cache
        self._sink = sink
        self._scheduler = scheduler if scheduler is not None else FifoScheduler()

        # Shared between callers and the engine thread, guarded by _lock.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: dict[int, Request] = {}  # every request not DONE, by id
        self._by_key: dict[object, Request] = {}  # pending requests submitted with a key
        self._cancels: list[Request] = []  # cancelled, not yet reported by the engine thread
        self._forget: list[object] = []  # owners whose cached sessions the engine thread must drop
        self._scopes: dict = {}  # owner -> its prefix-sharing scope (owners of one scope reuse each other's KV)
        self._closed = False
        self._stats = {"active": 0, "steps": 0, "tokens_generated": 0, "prompt_tokens": 0,
                       "resident": 0, "cached_sessions": 0, "kv_cells_used": 0}
        self._profile = Profile()  # engine-thread counters, read by stats() from any thread

        # The model: loaded by the engine thread; tokenize/render_chat/prepare use it on the caller's thread
        # under _model_lock, which the engine thread takes to free it.
        self._model_lock = threading.Lock()
        self._model = Model(self.model_path)
        self._thread: threading.Thread | None = None
        self._loaded = threading.Event()
        self._load_error: EngineError | None = None

        # Engine thread only.
        self._ctx = None
        self._mem = None
        self._batch = None
        self._sampler: Sampler | None = None
        self._swap = Swap(ram_budget=swap_ram_mb * MB, disk_budget=swap_disk_mb * MB, swap_dir=swap_dir,
                          enabled=snapshots)
        self._slots = Slots(n_seq_max, kv_size, self._swap, kv_unified=kv_unified, share_prefix=share_prefix,
                            scopes=self._scopes)
        self._running: set[Request] = set()  # who ran in the last step (the scheduler's hysteresis)
        self._step_no = 0
        self._events: list[Event] = []  # this step's events, handed to the sink at its end
        self._token_s = DEFAULT_TOKEN_S  # engine seconds one batch token costs (a moving average of steps)

    @property
    def model_name(self) -> str:
        """The model file's basename (for logs)."""
        return self._model.name

    # ---- public API (any thread) -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread and block until it has loaded the model and created the context.

        Raises ``EngineError("EIO")`` saying what failed (the thread is gone then), ``EINVAL`` after ``close``.
        """
        with self._lock:
            if self._closed:
                raise EngineError("EINVAL", "the engine is closed; create a new one")
            if self._thread is not None:
                if self._load_error is not None:
                    raise self._load_error
                return
            self._thread = threading.Thread(target=self._run, name=f"llm-engine-{self.name}", daemon=True)
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            self._thread.join()
            raise self._load_error
        log.info("engine %s: %s loaded; %d slots, %d active, %d KV cells, %d tokens a sequence, batch %d, "
                 "%d threads, %s scheduler", self.name, self.model_name, self.n_seq_max, self.max_active,
                 self.kv_size, self.n_ctx_seq, self.n_batch, self.n_threads, self._scheduler.name)

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """The model's tokens for ``text`` (BOS first when ``add_bos``; control tokens such as
        ``<start_of_turn>`` parsed when ``special``).  Needs ``start`` first."""
        with self._model_lock:
            self._require_model()
            return self._model.tokenize(text, add_bos=add_bos, special=special)

    def render_chat(self, messages: list[dict]) -> str:
        """Render ``messages`` (``[{"role": "system"|"user"|"assistant", "content": str}]``) with the model's own
        chat template, ending in an open assistant turn.  Raises ``EngineError("EINVAL")`` for a bad message."""
        chat = chat_messages(messages)
        with self._model_lock:
            self._require_model()
            return self._model.render_chat(chat)

    def submit(self, prompt: str | list[int], params: SamplingParams, *, owner=None, tag=None,
               stream: bool = False, priority: int = 0, key=None, scope=None) -> Request:
        """Queue a generation of ``prompt`` (text, tokenized here with BOS and special tokens; or token ids used
        as given) and return its handle at once; its events go to the sink.  A queued request waits, never
        dropped, until the scheduler runs it and a slot and KV cells are free.  ``prepare`` then ``enqueue``.

        ``owner`` (an agent id) is whom the fair scheduler accounts and whose cached prefixes the request may
        reuse; ``scope`` (hashable, fixed for an owner's life) widens that reuse to every owner of the same scope
        (a privilege group, a fleet: docs/engine.md, "Prefix sharing"); ``priority`` weights the fair scheduler
        (the owner's group priority); ``key`` (hashable) lets ``cancel_key`` find the request.  Raises ``EINVAL``
        (bad params, token ids or json_schema), ``E2BIG`` (the prompt leaves no room for one token in the
        per-sequence context), ``ECANCELED`` (the engine is closed), ``EIO`` (not started).
        """
        return self.enqueue(self.prepare(prompt, params), owner=owner, tag=tag, stream=stream, priority=priority,
                            key=key, scope=scope)

    def prepare(self, prompt: str | list[int] | None, params: SamplingParams, *,
                messages: list[dict] | None = None) -> Prepared:
        """Everything ``submit`` does before queueing, on the caller's thread: check ``params``, render
        ``messages`` (if given, instead of ``prompt``) with the chat template, tokenize, build the json_schema
        grammar and the C samplers.  This is the costly part of a submission (a 1 MiB prompt takes ~1 s to
        tokenize, a large grammar as long to parse), so the kernel calls it from a worker thread with a large
        stack (kernel/worker.py), never from its event loop.  Raises as ``submit``; the result must be given to
        ``enqueue`` or ``free``d."""
        started = time.thread_time()
        check_params(params)
        grammar_text = schema_grammar(params.json_schema) if params.json_schema is not None else None
        if messages is not None:
            prompt = self.render_chat(messages)
        if isinstance(prompt, str):
            tokens = self.tokenize(prompt)
        else:
            with self._model_lock:
                self._require_model()
            tokens = list(prompt)
            if not tokens:
                raise EngineError("EINVAL", "prompt is empty")
            n_vocab = self._model.n_vocab
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab for t in tokens):
                raise EngineError("EINVAL", f"prompt token ids must be integers in 0..{n_vocab - 1}")
        if len(tokens) + 1 > self.n_ctx_seq:
            raise EngineError("E2BIG", f"prompt is {len(tokens)} tokens; this model's per-sequence context is "
                              f"{self.n_ctx_seq} tokens (prompt + output), so a prompt may have at most "
                              f"{self.n_ctx_seq - 1}: shorten it")
        params = SamplingParams(params.max_tokens, float(params.temperature), params.top_k, float(params.top_p),
                                params.seed, list(params.stop), params.json_schema)  # a private copy
        with self._model_lock:
            self._require_model()
            sampler, grammar = make_samplers(self._model.vocab, params, grammar_text)
        return Prepared(self, tokens, params, sampler, grammar, time.thread_time() - started)

    def enqueue(self, prep: Prepared, *, max_tokens: int | None = None, owner=None, tag=None,
                stream: bool = False, priority: int = 0, key=None, scope=None) -> Request:
        """Queue a request ``prepare`` made (by this engine), with at most ``max_tokens`` (default: its params')
        and return its handle; arguments as ``submit``.  The fair scheduler charges the owner for what preparing
        cost, in tokens of engine time.  ``prep`` is consumed even when this raises ``ECANCELED``."""
        if prep.engine is not self or prep.sampler is None:
            raise ValueError("enqueue takes a Prepared of this engine, once")
        if max_tokens is not None:
            prep.params.max_tokens = max(1, min(prep.params.max_tokens, max_tokens))
        sampler, grammar = prep.sampler, prep.grammar
        prep.sampler = prep.grammar = None
        try:
            with self._lock:
                if self._closed:
                    raise EngineError("ECANCELED", "the engine is shutting down")
                req = Request(next_request_id(), prep.tokens, prep.params, owner, tag, bool(stream), int(priority),
                              key, self.name)
                req._sampler, req._grammar = sampler, grammar
                if scope is not None and owner is not None:
                    self._scopes[owner] = scope
                self._pending[req.id] = req
                if key is not None:
                    self._by_key[key] = req
                self._scheduler.add(req)
                self._scheduler.charge(req, self._token_equivalent(prep.cost_s))
                self._wake.notify()
        except BaseException:
            free_samplers(sampler, grammar)
            raise
        return req

    def cancel_owner(self, owner) -> int:
        """Cancel every pending request of ``owner`` and drop its cached sessions; return how many requests were
        cancelled.  (The kernel calls this when an agent is killed or ends.)"""
        with self._lock:
            self._forget.append(owner)
            self._wake.notify()
            return sum(self._cancel_locked(r) for r in list(self._pending.values()) if r.owner == owner)

    def stats(self) -> dict:
        """Counters: ``active`` (sequences in the last step), ``waiting`` (pending requests not in it),
        ``resident`` (busy slots), ``cached_sessions`` (idle sessions in slots), ``steps``, ``tokens_generated``,
        ``prompt_tokens`` (prompt tokens computed), ``cached_tokens`` and ``prefix_hits`` (prompt tokens and
        requests that reused cached KV), swap's ``evictions``, ``restores``, ``text_evictions``,
        ``snapshots_ram``, ``snapshots_disk``, ``swap_ram_bytes``, ``swap_disk_bytes``..., and the profile
        (``Profile``: where the engine thread's time went)."""
        with self._lock:
            out = dict(self._stats)
            out["waiting"] = max(0, len(self._scheduler) - out["active"])
        out.update(self._slots.counts)
        out.update(self._swap.stats())
        out.update(self._profile.stats())
        out["scheduler"] = self._scheduler.name
        return out

    def close(self) -> None:
        """Cancel everything pending (``ECANCELED``), stop and join the engine thread, free the model.
        Idempotent; ``submit`` raises ``ECANCELED`` afterwards."""
        with self._lock:
            self._closed = True
            for req in list(self._pending.values()):
                self._cancel_locked(req)
            self._wake.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # ---- helpers for callers ----------------------------------------------------------------------------

    def _require_model(self) -> None:
        """Raise unless the model is loaded and not closed.  Call with ``_model_lock`` held."""
        if self._closed:
            raise EngineError("ECANCELED", "the engine is shutting down")
        if not self._loaded.is_set() or not self._model.loaded:
            raise EngineError("EIO", "the LLM engine is not running (start() it first)")

    def _cancel_locked(self, req: Request) -> bool:
        if req._state == DONE or req._cancelled:
            return False
        req._cancelled = True
        self._scheduler.remove(req)
        self._cancels.append(req)
        self._wake.notify()
        return True

    # ---- the engine thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        """Engine thread: load, loop over steps until closed, then cancel what is left and free everything."""
        try:
            self._load()
        except Exception as exc:
            self._load_error = exc if isinstance(exc, EngineError) else EngineError("EIO", f"loading failed: {exc}")
            self._free()
            self._loaded.set()
            return
        self._loaded.set()
        try:
            while self._wait_for_work():
                try:
                    self._step()
                except Exception as exc:  # a bug or a failing llama call: fail what ran, keep serving
                    log.exception("engine step failed")
                    self._reset(EngineError("EIO", f"the LLM engine failed: {exc}"))
                self._hand_over()
        finally:
            with self._lock:  # closed, or dying of a bug: either way nothing may wait forever
                self._closed = True
                for req in list(self._pending.values()):
                    self._cancel_locked(req)
            try:
                self._take_cancellations()
                self._hand_over()
            finally:
                self._free()

    def _load(self) -> None:
        """Load the model and create the context and batch; raise ``EngineError("EIO")`` saying what failed."""
        self._model.load()
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = self.kv_size
        cp.n_batch = cp.n_ubatch = self.n_batch
        cp.n_seq_max = self.n_seq_max
        cp.n_threads = cp.n_threads_batch = self.n_threads
        # unified: one KV pool shared by all sequences (prefix sharing is free, memory is pooled, but every
        # sequence's attention walks the whole used range); streams: a pool per slot (a shared prefix is copied)
        cp.kv_unified = self.kv_unified
        cp.swa_full = True  # a full-size sliding-window cache, so a sequence's KV can be cut back to a prefix
        cp.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model.model, cp)
        if not self._ctx:
            raise EngineError("EIO", f"llama.cpp could not create a context of {cp.n_ctx} KV cells and "
                              f"{self.n_seq_max} sequences: out of memory? lower [llm] kv_size or n_seq_max")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._sampler = Sampler(self._model.n_vocab)
        self._swap.attach(self._ctx, self._mem)
        self._slots.attach(self._mem, self._model.n_swa)

    def _free(self) -> None:
        """Free the snapshots, batch, context and model (engine thread, after the loop)."""
        self._swap.clear()
        self._slots.sessions.clear()
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
        self._ctx = self._mem = None
        with self._model_lock:
            self._model.free()

    def _wait_for_work(self) -> bool:
        """Block (no CPU) until there is something to do; False when the engine is closing."""
        with self._lock:
            if not (self._closed or self._cancels or self._forget or len(self._scheduler)):
                idle_from = time.perf_counter()
                while not (self._closed or self._cancels or self._forget or len(self._scheduler)):
                    self._wake.wait()
                self._profile.idle_s += time.perf_counter() - idle_from
            return not self._closed

    def _step(self) -> None:
        """One turn of the loop, as llama.cpp's examples/parallel: who runs, make them resident, one batch,
        decode, sample and retire.  The step's events go to the sink afterwards, in one call (``_hand_over``)."""
        prof, started = self._profile, time.perf_counter()
        self._take_cancellations()
        with self._lock:
            order = self._scheduler.order(self.max_active, self._running, self._unfinished())
        plan = self._plan(order)
        rows = self._fit_step(plan)
        self._running = {seq.req for seq, _ in rows}
        planned = time.perf_counter()
        prof.plan_s += planned - started
        if rows:
            self._step_no += 1
            self._fill_batch(rows)
            if self._decode(rows):
                sampled = time.perf_counter()
                self._sample(rows)
                prof.sample_s += time.perf_counter() - sampled
        with self._lock:
            self._stats["active"] = sum(req._state != DONE for req in self._running)
            self._stats["resident"] = self._slots.n_busy()
            self._stats["cached_sessions"] = self._slots.n_cached()
            self._stats["kv_cells_used"] = self._slots.kv_used()
        prof.step_s += time.perf_counter() - started

    def _unfinished(self) -> list[Request]:
        """Requests that ran last step, are resident and have not sampled a token since becoming resident (the
        scheduler's minimum quantum keeps them running).  Call with ``_lock`` held."""
        return [r for r in self._running if r._state == RUNNING and not r._cancelled
                and r._seq.slot is not None and r._seq.turn == 0]

    # -- cancellation --

    def _take_cancellations(self) -> None:
        """Report ECANCELED for every request cancelled since the last step, freeing its sequence; drop the
        cached sessions of owners that are gone."""
        with self._lock:
            cancels, self._cancels = self._cancels, []
            forget, self._forget = self._forget, []
        for req in cancels:
            if req._seq is not None:
                self._slots.retire(req._seq, keep=False)
            self._finish(req, "error", EngineError("ECANCELED", "the request was cancelled"))
        for owner in forget:
            with self._lock:
                self._scopes.pop(owner, None)
            self._slots.forget(owner)

    # -- admission --

    def _plan(self, order: list[Request]) -> list[Seq]:
        """Make the scheduler's choice resident, best first; stop at the first that cannot get room."""
        plan: list[Seq] = []
        wanted = set(order)
        for req in order:
            seq = req._seq or self._start(req)
            if seq.slot is None and not self._slots.make_resident(seq, plan, wanted):
                if plan:
                    break  # it waits (queued, never dropped) until room frees up
                # The best request cannot get room with everything else evicted: only a bug gets here.
                self._fail(seq, EngineError("EIO", "the LLM engine could not make room for this request"))
                continue
            plan.append(seq)
        return plan

    def _start(self, req: Request) -> Seq:
        with self._lock:
            req._state = RUNNING
        self._profile.started(req)
        req._seq = Seq(req, req._sampler, req._grammar, Detokenizer(req.params.stop), list(req.tokens))
        return req._seq

    # -- one batch --

    def _fit_step(self, plan: list[Seq]) -> list[tuple[Seq, int]]:
        """The rows of this step, ``[(seq, n_tokens)]``: one for every decoding sequence, then prompt chunks in
        the plan's order until ``n_batch`` -- or, while any sequence is decoding, until ``prefill_chunk``
        prompt tokens (chunked prefill: a long prompt must not stall the streams around it for a whole
        ``n_batch`` step); evicting idle and preempted sequences, and then leaving out the sequence the
        scheduler sheds, until the step's new tokens fit the KV pool."""
        while True:
            rows, n = [], 0
            for seq in plan:  # decoding sequences (one token to feed) first: every one gets its row
                if len(seq.tokens) - seq.n_past == 1:
                    rows.append((seq, 1))
                    n += 1
            cap = min(self.n_batch, n + self.prefill_chunk) if n else self.n_batch
            for seq in plan:
                left = len(seq.tokens) - seq.n_past
                if left > 1 and n < cap:
                    k = min(left, cap - n)
                    rows.append((seq, k))
                    n += k
            if self._slots.kv_used() + n <= self.kv_size or not plan:
                return rows
            victim = self._slots.victim({s.slot for s in plan}, set())
            if victim is not None:
                self._slots.evict(victim)
            else:  # stays resident (preempted); evictable on the next turn of this loop
                with self._lock:
                    shed = plan.pop(self._scheduler.shed(plan))
                self._profile.shed += 1
                log.debug("engine %s: request %d sits this step out: its tokens do not fit the KV pool",
                          self.name, shed.req.id)

    def _fill_batch(self, rows: list[tuple[Seq, int]]) -> None:
        """Put the rows in the batch; a sequence's last known token alone gets logits (``seq.row``)."""
        n = 0
        for seq, k in rows:
            base, seq_id = seq.n_past, seq.slot.seq_id
            for j in range(k):
                self._put(n + j, seq.tokens[base + j], base + j, seq_id, False)
            n += k
            seq.n_queued = k
            if base + k == len(seq.tokens):
                self._batch.logits[n - 1] = 1
                seq.row = n - 1
            else:
                seq.row = -1
        self._batch.n_tokens = n

    def _put(self, row: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        b = self._batch
        b.token[row] = token
        b.pos[row] = pos
        b.n_seq_id[row] = 1
        b.seq_id[row][0] = seq_id
        b.logits[row] = logits

    def _decode(self, rows: list[tuple[Seq, int]]) -> bool:
        """Decode the batch.  On success advance every sequence, charge the scheduler and return True.  When the
        KV pool has no room after all, evict and let the next step retry; on any other failure fail the
        sequences in the batch with EIO (the engine goes on serving the others).  False: nothing to sample."""
        started = time.perf_counter()
        ret = llama_cpp.llama_decode(self._ctx, self._batch)
        elapsed = time.perf_counter() - started
        if ret == 1:  # no KV slot: the pool is fragmented or our count is off; make room, retry next step
            log.warning("engine: llama_decode found no KV room for %d tokens; evicting", self._batch.n_tokens)
            victim = self._slots.victim(set(), set()) if len(rows) > 1 else None
            if victim is not None:
                self._slots.evict(victim)
                return False
        if ret != 0:
            log.error("llama_decode failed (%d) on a batch of %d tokens", ret, self._batch.n_tokens)
            err = EngineError("EIO", f"llama_decode failed ({ret}); the request was dropped, retry it")
            for seq, _ in rows:
                self._fail(seq, err)
            return False
        n_prompt = 0
        for seq, k in rows:
            n_prompt += max(0, min(seq.n_past + k, len(seq.req.tokens)) - seq.n_past)
            seq.n_past += k
            seq.last_ran = self._step_no
        n = self._batch.n_tokens
        self._profile.decoded(rows, elapsed)
        self._token_s += 0.1 * (elapsed / n - self._token_s)
        with self._lock:
            self._stats["steps"] += 1
            self._stats["prompt_tokens"] += n_prompt
            for seq, k in rows:
                self._scheduler.charge(seq.req, k)
        return True

    def _token_equivalent(self, seconds: float) -> float:
        """``seconds`` of engine time in batch tokens (what the schedulers count service in)."""
        return seconds / self._token_s if seconds > 0 else 0.0

    def _sample(self, rows: list[tuple[Seq, int]]) -> None:
        """Sample the next token of every sequence that has logits this step, and retire the finished ones."""
        n_new = 0
        model, sampler, ctx = self._model, self._sampler, self._ctx
        for seq, _ in rows:
            if seq.row < 0:
                continue
            if seq.grammar is None:
                token = sampler.sample(ctx, seq.row, seq.sampler, None, greedy=seq.req.params.temperature == 0)
            else:  # constrained sampling can cost many steps' time: charged to its owner as tokens
                started = time.perf_counter()
                token = sampler.sample(ctx, seq.row, seq.sampler, seq.grammar)
                cost = self._token_equivalent(time.perf_counter() - started)
                with self._lock:
                    self._scheduler.charge(seq.req, cost)
            seq.turn += 1
            if token < 0 or model.is_eog(token):
                self._complete(seq, "stop")
                continue
            n_new += 1
            seq.n_generated += 1
            self._chunk(seq, seq.text.feed(model.piece(token)))
            if seq.text.stopped:
                self._complete(seq, "stop")
            elif seq.n_generated >= seq.req.params.max_tokens or len(seq.tokens) + 1 >= self.n_ctx_seq:
                self._complete(seq, "length")  # len + 1: the prompt, the tokens fed, and this one
            else:
                seq.tokens.append(token)
        with self._lock:
            self._stats["tokens_generated"] += n_new

    # -- retirement --

    def _chunk(self, seq: Seq, text: str) -> None:
        if text and seq.req.stream and not seq.req._cancelled:
            self._events.append((seq.req, "chunk", {"text": text}))

    def _complete(self, seq: Seq, reason: str) -> None:
        """Retire a sequence that ended normally: flush its held-back text, keep its KV as its owner's cached
        session, report done."""
        self._chunk(seq, seq.text.finish())
        if seq.text.stopped:
            reason = "stop"
        self._slots.retire(seq, keep=self.session_cache)
        usage = {"prompt_tokens": len(seq.req.tokens), "completion_tokens": seq.n_generated,
                 "cached_tokens": seq.n_cached}
        self._finish(seq.req, "done", {"text": seq.text.text, "finish_reason": reason, "usage": usage})

    def _fail(self, seq: Seq, err: EngineError) -> None:
        """Retire a sequence with an error."""
        self._slots.retire(seq, keep=False)
        self._finish(seq.req, "error", err)

    def _reset(self, err: EngineError) -> None:
        """After a failed step: fail every started request with ``err``, clear the KV cache and every snapshot.
        Requests that never started stay queued."""
        with self._lock:
            started = [r for r in self._pending.values() if r._seq is not None]
        self._slots.reset()
        try:
            llama_cpp.llama_memory_clear(self._mem, True)
        except Exception:
            log.exception("engine: clearing the KV cache failed")
        for req in started:
            req._seq.slot = None
            if req._seq.snapshot is not None:
                self._swap.discard(req._seq.snapshot)
                req._seq.snapshot = None
            self._finish(req, "error", err)
        self._running = set()

    def _finish(self, req: Request, kind: str, payload) -> None:
        """Queue a request's last event, once, and free its samplers.  A cancelled request always reports
        ECANCELED, as ``cancel`` promised, even if it completed or failed meanwhile."""
        with self._lock:
            if req._state == DONE:
                return
            req._state = DONE
            del self._pending[req.id]
            if req.key is not None and self._by_key.get(req.key) is req:
                del self._by_key[req.key]
            self._scheduler.remove(req)
            cancelled = req._cancelled
        free_samplers(req._sampler, req._grammar)
        req._sampler = req._grammar = None
        if cancelled:
            kind, payload = "error", EngineError("ECANCELED", "the request was cancelled")
        if kind == "error" and payload.usage is None:
            payload = EngineError(payload.code, payload.message)  # a private copy: errors are shared by rows
            payload.usage = usage_so_far(req)
        self._events.append((req, kind, payload))

    def _hand_over(self) -> None:
        """Give the step's events to the sink, in one call (one wake-up of the kernel's main thread a step)."""
        if not self._events:
            return
        events, self._events = self._events, []
        try:
            self._sink(events)
        except Exception:  # the sink is the caller's; its failure must not stop the engine
            log.exception("engine sink failed on %d events", len(events))


class Profile:
    """Where the engine thread's time goes, always on (a few clock reads a step); written by the engine thread,
    read by ``Engine.stats`` from any thread (``stats``).  docs/engine.md, "Profile", explains each figure.

    ``llama_decode`` time is split by the kind of batch: *decode* steps carry only sequences' next tokens,
    *prefill* steps only prompt (or recomputed) tokens, *mixed* steps both; ``tokens_decode`` and
    ``tokens_prefill`` count the tokens of each kind over all steps, ``rows`` the sequences per step."""

    def __init__(self):
        self.decode_s = {"decode": 0.0, "prefill": 0.0, "mixed": 0.0}
        self.decode_steps = {"decode": 0, "prefill": 0, "mixed": 0}
        self.tokens_decode = 0  # batch tokens that were a sequence's next token
        self.tokens_prefill = 0  # batch tokens of a prompt chunk or a recomputation
        self.rows = 0  # sequences in batches, summed over steps
        self.plan_s = 0.0  # scheduler, residency (prefix search, eviction, restore), fitting the batch
        self.sample_s = 0.0  # sampling, detokenising, stop strings, retirement
        self.step_s = 0.0  # whole steps
        self.idle_s = 0.0  # waiting for work
        self.shed = 0  # sequences left out of a step for KV room
        self.queued_s = 0.0  # time requests spent queued before they first ran, summed
        self.n_started = 0

    def started(self, req: Request) -> None:
        self.queued_s += time.monotonic() - req._queued_at
        self.n_started += 1

    def decoded(self, rows: list[tuple[Seq, int]], elapsed: float) -> None:
        n_decode = sum(1 for seq, k in rows if k == 1 and seq.n_past > len(seq.req.tokens))
        n_all = sum(k for _, k in rows)
        kind = "decode" if n_decode == n_all else ("prefill" if n_decode == 0 else "mixed")
        self.decode_s[kind] += elapsed
        self.decode_steps[kind] += 1
        self.tokens_decode += n_decode
        self.tokens_prefill += n_all - n_decode
        self.rows += len(rows)

    def stats(self) -> dict:
        out = {f"decode_s_{k}": v for k, v in self.decode_s.items()}
        out.update({f"decode_steps_{k}": v for k, v in self.decode_steps.items()})
        out.update(tokens_decode=self.tokens_decode, tokens_prefill=self.tokens_prefill, batch_rows=self.rows,
                   plan_s=self.plan_s, sample_s=self.sample_s, step_s=self.step_s, idle_s=self.idle_s,
                   shed=self.shed, queued_s=self.queued_s, requests_started=self.n_started)
        return out
