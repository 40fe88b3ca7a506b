"""The LLM engine: many generations at once in one llama.cpp context (continuous batching).

Modelled on llama.cpp's ``examples/parallel``.  One engine thread owns the model and the context (a llama
context must only ever be touched from one thread; ctypes releases the GIL while llama.cpp computes, so the
kernel's other threads keep running) and loops::

    wait until there is work
    take cancellations                  -> free their sequences, report ECANCELED
    admit waiting requests              -> into free sequence slots, in the order the policy gives
    fill one batch                      -> the next token of every decoding sequence, then prompt chunks
    llama_decode once
    sample each sequence from its row   -> its own C sampler chain; then retire finished sequences

Mechanism (batch, decode, sample, free) lives here; which waiting request runs next is the policy object's
choice (``FifoPolicy`` for now).  Results go to the caller's sink, called from the engine thread.

Batching changes numerics slightly: llama.cpp's CPU kernels choose their algorithm by the shape of a batch
(e.g. >= 8 tokens, >= 64 tokens, a lone token over >= 512 KV cells), and the algorithms round differently:
measured on Gemma 3 270M, a sequence's logits move by up to ~2 depending on what it shares a batch with.  So
a greedy generation equals its solo run token for token only while the top choice wins by a clear margin;
16 concurrent 64-token essays matched their solo runs in 1-2 of 16 cases (and the same concurrent workload
can differ from run to run: submission timing decides who shares a batch).  Weights are not repacked
(``use_extra_bufts = False``): the repacked Q4_K kernels add one more such switch (at 4 rows) and were
slower here (150-160 vs 75-100 tok/s for 16 sequences).
"""
from __future__ import annotations

import codecs
import ctypes
import heapq
import itertools
import logging
import math
import os
import random
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import llama_cpp

log = logging.getLogger(__name__)

MAX_TOKENS_LIMIT = 4096  # ABI: max_tokens is 1..4096
MAX_STOP_SEQUENCES = 8  # ABI: stop is at most 8 non-empty strings
CHAT_ROLES = ("system", "user", "assistant")
# A model file without a chat template (a base model) gets its family's built-in llama.cpp template; llama.cpp
# itself would silently use ChatML, whose markers such a model has never seen.
BUILTIN_CHAT_TEMPLATES = {"gemma": b"gemma", "gemma2": b"gemma", "gemma3": b"gemma", "gemma3n": b"gemma"}


class EngineError(Exception):
    """An error with an ABI error code (docs/abi.md section 3): ``.code`` is e.g. ``"E2BIG"``, ``"EINVAL"``,
    ``"ECANCELED"``, ``"EIO"``; ``str()`` is the message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"EngineError({self.code!r}, {self.message!r})"


@dataclass
class SamplingParams:
    """How to generate; the ABI arguments of ``llm.generate`` minus ``prompt`` and ``stream``."""

    max_tokens: int = 128
    temperature: float = 0.0  # 0 => greedy
    top_k: int = 40  # 0 disables
    top_p: float = 0.95  # 1.0 disables
    seed: int | None = None  # None => random
    stop: list[str] = field(default_factory=list)


def check_params(p: SamplingParams) -> None:
    """Raise ``EngineError("EINVAL")`` naming the first argument out of the ABI's range; return otherwise."""

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v):
        return (is_int(v) or isinstance(v, float)) and math.isfinite(v)

    if not is_int(p.max_tokens) or not 1 <= p.max_tokens <= MAX_TOKENS_LIMIT:
        raise EngineError("EINVAL", f"max_tokens must be an integer in 1..{MAX_TOKENS_LIMIT}, got {p.max_tokens!r}")
    if not is_num(p.temperature) or p.temperature < 0:
        raise EngineError("EINVAL", f"temperature must be a number >= 0, got {p.temperature!r}")
    if not is_int(p.top_k) or p.top_k < 0:
        raise EngineError("EINVAL", f"top_k must be an integer >= 0 (0 disables), got {p.top_k!r}")
    if not is_num(p.top_p) or not 0 < p.top_p <= 1:
        raise EngineError("EINVAL", f"top_p must be a number in (0, 1] (1 disables), got {p.top_p!r}")
    if p.seed is not None and (not is_int(p.seed) or p.seed < 0):
        raise EngineError("EINVAL", f"seed must be an integer >= 0 or nil, got {p.seed!r}")
    if not isinstance(p.stop, (list, tuple)) or len(p.stop) > MAX_STOP_SEQUENCES:
        raise EngineError("EINVAL", f"stop must be a list of at most {MAX_STOP_SEQUENCES} non-empty strings")
    for s in p.stop:
        if not isinstance(s, str) or not s:
            raise EngineError("EINVAL", f"stop must hold non-empty strings, got {s!r}")


# Request life cycle: WAITING (in the policy) -> RUNNING (owns a sequence slot) -> DONE (sink got done/error).
WAITING, RUNNING, DONE = "waiting", "running", "done"


class Request:
    """One generation, created by ``Engine.submit``.  The caller treats it as an opaque handle: ``id`` is unique
    per engine; ``owner`` and ``tag`` are whatever the caller passed (``tag`` comes back untouched in events)."""

    __slots__ = ("id", "owner", "tag", "stream", "params", "tokens", "_state", "_cancelled")

    def __init__(self, id: int, tokens: list[int], params: SamplingParams, owner, tag, stream: bool):
        self.id = id
        self.owner = owner
        self.tag = tag
        self.stream = stream
        self.params = params
        self.tokens = tokens  # the prompt (a text prompt's BOS included)
        self._state = WAITING  # guarded by Engine._lock
        self._cancelled = False  # guarded by Engine._lock

    def __repr__(self) -> str:
        return f"<Request {self.id} owner={self.owner!r} {self._state} prompt={len(self.tokens)}t>"


Sink = Callable[[Request, str, object], None]


class FifoPolicy:
    """Which waiting request gets the next free sequence slot: first come, first served.

    The engine calls these under its lock; a policy need not be thread-safe.  Later policies (round robin per
    owner, fair share, preemption) keep this interface.
    """

    def __init__(self):
        self._queue: deque[Request] = deque()

    def push(self, req: Request) -> None:
        """A request starts waiting."""
        self._queue.append(req)

    def pop_next(self) -> Request | None:
        """The request to admit now, removed from the policy; None when nothing waits."""
        return self._queue.popleft() if self._queue else None

    def remove(self, req: Request) -> None:
        """A waiting request leaves without running (it was cancelled)."""
        self._queue.remove(req)

    def __len__(self) -> int:
        return len(self._queue)


class TextStream:
    """Turns one sequence's generated token bytes into text: incremental UTF-8, stop strings, streaming hold-back.

    ``feed(piece)`` returns the text that became safe to emit: never a broken multibyte character, never text that
    could still be the beginning of a stop string.  Once a stop string occurs, ``stopped`` is True and ``text``
    ends right before its first occurrence.  ``finish()`` returns what was held back; after it, the concatenation
    of everything returned equals ``text`` exactly.
    """

    def __init__(self, stop: list[str]):
        self.text = ""
        self.stopped = False
        self._stop = list(stop)
        self._longest = max((len(s) for s in self._stop), default=0)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._emitted = 0  # len(text) already returned

    def feed(self, piece: bytes, final: bool = False) -> str:
        """Add a token's bytes; return the newly safe text (maybe empty)."""
        if self.stopped:
            return ""
        new = self._decoder.decode(piece, final)
        if new:
            # A stop string not found before must end inside the new text.
            search_from = max(0, len(self.text) - self._longest + 1)
            self.text += new
            cut = self._first_stop(search_from)
            if cut is not None:
                self.text = self.text[:cut]
                self.stopped = True
                return self._take(cut)
        return self._take(len(self.text) if final else len(self.text) - self._holdback())

    def finish(self) -> str:
        """Flush the decoder (an incomplete character becomes U+FFFD) and return all text still held back."""
        return self.feed(b"", final=True)

    def _first_stop(self, start: int) -> int | None:
        hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _holdback(self) -> int:
        """Length of the longest end of ``text`` that is a proper beginning of some stop string."""
        for k in range(min(self._longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(len(s) > k and s.startswith(tail) for s in self._stop):
                return k
        return 0

    def _take(self, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        chunk = self.text[self._emitted : upto]
        self._emitted = upto
        return chunk


@dataclass(eq=False)
class _Seq:
    """A running request's state inside the engine thread (only that thread touches it)."""

    req: Request
    seq_id: int  # its slot: the llama sequence id, 0..n_seq_max-1
    sampler: object  # its llama_sampler chain (C pointer)
    text: TextStream
    n_past: int = 0  # tokens in the KV cache = position of the next token
    sampled: int | None = None  # last sampled token, not yet in the KV cache (None while prefilling)
    n_generated: int = 0  # completion tokens so far (an EOG token is not counted)
    n_queued: int = 0  # tokens of this sequence in the current batch
    row: int = -1  # batch row whose logits to sample this step; -1: nothing to sample

    @property
    def prefilling(self) -> bool:
        return self.sampled is None


_backend_lock = threading.Lock()
_backend_ready = False
_LLAMA_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level WARN, ERROR; DEBUG/INFO dropped


@llama_cpp.llama_log_callback
def _llama_log(level: int, text: bytes, user_data) -> None:
    """llama.cpp's log lines: warnings and errors to our logger, the (very chatty) rest dropped."""
    if level in _LLAMA_LOG_LEVELS:
        log.log(_LLAMA_LOG_LEVELS[level], "llama.cpp: %s", text.decode("utf-8", errors="replace").rstrip())


def _backend_init() -> None:
    """Once per process: route llama.cpp's logging to ours and initialise its backend."""
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_log_set(_llama_log, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True


class Engine:
    """The model and its sequences.  ``start`` loads; ``submit`` queues a generation whose events go to ``sink``.

    Every public method is thread-safe and never blocks on generation.  ``sink(request, kind, payload)`` is
    called from the engine thread and must be cheap:

    - ``"chunk"``, ``{"text": str}``: only when ``request.stream``, only non-empty text;
    - ``"done"``, ``{"text", "finish_reason": "stop"|"length", "usage": {"prompt_tokens", "completion_tokens"}}``;
    - ``"error"``, an ``EngineError`` (``ECANCELED`` after cancel or close, ``EIO`` when decoding failed).

    Exactly one of done/error per request, always its last event.
    """

    def __init__(self, model_path: str, sink: Sink, *, n_ctx_seq: int = 2048, n_seq_max: int = 16,
                 n_threads: int | None = None, n_batch: int = 512, policy: FifoPolicy | None = None):
        if not 1 <= n_seq_max <= 256:
            raise EngineError("EINVAL", f"n_seq_max must be in 1..256 (llama.cpp's limit), got {n_seq_max}")
        if n_ctx_seq < 2:
            raise EngineError("EINVAL", f"n_ctx_seq must be at least 2 tokens, got {n_ctx_seq}")
        if n_batch < n_seq_max:
            raise EngineError("EINVAL", f"n_batch ({n_batch}) must be >= n_seq_max ({n_seq_max}): every running "
                              "sequence needs a row in each batch")
        self.model_path = str(model_path)
        self.n_ctx_seq = n_ctx_seq
        self.n_seq_max = n_seq_max
        self.n_batch = n_batch
        self.n_threads = n_threads or os.cpu_count() or 1
        self._sink = sink
        self._policy = policy if policy is not None else FifoPolicy()

        # Shared between callers and the engine thread, guarded by _lock.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: dict[int, Request] = {}  # every request not DONE, by id
        self._cancels: list[Request] = []  # cancelled, not yet reported by the engine thread
        self._closed = False
        self._ids = itertools.count(1)
        self._stats = {"steps": 0, "tokens_generated": 0, "prompt_tokens": 0}

        # Set by the engine thread while loading; read-only until freed.  tokenize/render_chat use them on the
        # caller's thread under _model_lock, which the engine thread takes to free them.
        self._model_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loaded = threading.Event()
        self._load_error: EngineError | None = None
        self._model = None
        self._vocab = None
        self._n_vocab = 0
        self._chat_template: bytes | None = None

        # Engine thread only.
        self._ctx = None
        self._mem = None
        self._batch = None
        self._active: list[_Seq] = []  # admission order
        self._free_slots = list(range(n_seq_max))  # a heap: the lowest free sequence id first
        self._piece_buf = ctypes.create_string_buffer(256)

    @property
    def model_name(self) -> str:
        """The model file's basename (for logs)."""
        return os.path.basename(self.model_path)

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
            self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            self._thread.join()
            raise self._load_error
        log.info("engine: %s loaded; %d sequences x %d tokens, batch %d, %d threads",
                 self.model_name, self.n_seq_max, self.n_ctx_seq, self.n_batch, self.n_threads)

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """The model's tokens for ``text`` (BOS first when ``add_bos``; control tokens such as
        ``<start_of_turn>`` parsed when ``special``).  Needs ``start`` first."""
        data = text.encode("utf-8", errors="replace")
        cap = len(data) + 8
        with self._model_lock:
            self._require_model()
            while True:
                buf = (llama_cpp.llama_token * cap)()
                n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, special)
                if n >= 0:
                    return buf[:n]
                cap = -n

    def render_chat(self, messages: list[dict]) -> str:
        """Render ``messages`` (``[{"role": "system"|"user"|"assistant", "content": str}]``) with the model's own
        chat template, ending in an open assistant turn.  Raises ``EngineError("EINVAL")`` for a bad message."""
        if not isinstance(messages, list) or not messages:
            raise EngineError("EINVAL", "messages must be a non-empty list of {role, content} maps")
        arr = (llama_cpp.llama_chat_message * len(messages))()
        total = 0
        for i, m in enumerate(messages):
            role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
            if role not in CHAT_ROLES:
                raise EngineError("EINVAL", f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
            if not isinstance(content, str) or "\x00" in content:
                raise EngineError("EINVAL", f"messages[{i}].content must be a string without NUL characters")
            data = content.encode("utf-8", errors="replace")
            arr[i] = llama_cpp.llama_chat_message(role.encode(), data)
            total += len(data)
        size = 2 * total + 256
        with self._model_lock:
            self._require_model()
            while True:
                buf = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_chat_apply_template(self._chat_template, arr, len(messages), True, buf, size)
                if n < 0:
                    raise EngineError("EIO", f"llama.cpp does not support the chat template of {self.model_name}")
                if n <= size:
                    return buf.raw[:n].decode("utf-8", errors="replace")
                size = n

    def submit(self, prompt: str | list[int], params: SamplingParams, *, owner=None, tag=None,
               stream: bool = False) -> Request:
        """Queue a generation of ``prompt`` (text, tokenized here with BOS and special tokens; or token ids used
        as given) and return its handle at once; its events go to the sink.  A queued request waits, never
        dropped, until a sequence slot is free.

        Raises ``EINVAL`` (bad params or token ids), ``E2BIG`` (the prompt leaves no room for one token in the
        per-sequence context), ``ECANCELED`` (the engine is closed), ``EIO`` (not started).
        """
        check_params(params)
        if isinstance(prompt, str):
            tokens = self.tokenize(prompt)
        else:
            with self._model_lock:
                self._require_model()
            tokens = list(prompt)
            if not tokens:
                raise EngineError("EINVAL", "prompt is empty")
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self._n_vocab for t in tokens):
                raise EngineError("EINVAL", f"prompt token ids must be integers in 0..{self._n_vocab - 1}")
        if len(tokens) + 1 > self.n_ctx_seq:
            raise EngineError("E2BIG", f"prompt is {len(tokens)} tokens; this model's per-sequence context is "
                              f"{self.n_ctx_seq} tokens (prompt + output), so a prompt may have at most "
                              f"{self.n_ctx_seq - 1}: shorten it")
        params = SamplingParams(params.max_tokens, float(params.temperature), params.top_k, float(params.top_p),
                                params.seed, list(params.stop))  # a private copy: the caller may reuse theirs
        with self._lock:
            if self._closed:
                raise EngineError("ECANCELED", "the engine is shutting down")
            req = Request(next(self._ids), tokens, params, owner, tag, bool(stream))
            self._pending[req.id] = req
            self._policy.push(req)
            self._wake.notify()
        return req

    def cancel(self, request: Request) -> bool:
        """Cancel ``request`` if it is still pending (waiting or running) and return True; its sink then gets
        ``"error"`` ``ECANCELED`` (whatever else was under way) and the engine thread frees its sequence.
        False when it had already ended or was cancelled before."""
        with self._lock:
            return self._cancel_locked(request)

    def cancel_owner(self, owner) -> int:
        """Cancel every pending request of ``owner``; return how many were cancelled."""
        with self._lock:
            return sum(self._cancel_locked(r) for r in list(self._pending.values()) if r.owner == owner)

    def stats(self) -> dict:
        """``{"active", "waiting", "steps", "tokens_generated", "prompt_tokens"}``: sequences running now,
        requests queued, decode steps, completion tokens and prompt tokens decoded since start."""
        with self._lock:
            return {"active": len(self._active), "waiting": len(self._policy), **self._stats}

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
        if not self._loaded.is_set() or self._model is None:
            raise EngineError("EIO", "the LLM engine is not running (start() it first)")

    def _cancel_locked(self, req: Request) -> bool:
        if req._state == DONE or req._cancelled:
            return False
        req._cancelled = True
        if req._state == WAITING:
            self._policy.remove(req)
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
                    for seq in list(self._active):
                        self._fail(seq, EngineError("EIO", f"the LLM engine failed: {exc}"))
        finally:
            with self._lock:  # closed, or dying of a bug: either way nothing may wait forever
                self._closed = True
                for req in list(self._pending.values()):
                    self._cancel_locked(req)
            self._take_cancellations()
            self._free()

    def _load(self) -> None:
        """Load the model and create the context and batch; raise ``EngineError("EIO")`` saying what failed."""
        if not os.path.isfile(self.model_path):
            raise EngineError("EIO", f"model file {self.model_path} does not exist (run `make install`)")
        _backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.use_extra_bufts = False  # no repacked weights: faster here, and one batch-shape switch less
        self._model = llama_cpp.llama_model_load_from_file(self.model_path.encode(), mp)
        if not self._model:
            raise EngineError("EIO", f"llama.cpp could not load {self.model_path}: not a GGUF model it supports, "
                              "or a truncated file (delete it and run `make install`)")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._chat_template = self._find_chat_template()
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = self.n_ctx_seq * self.n_seq_max
        cp.n_batch = cp.n_ubatch = self.n_batch
        cp.n_seq_max = self.n_seq_max
        cp.n_threads = cp.n_threads_batch = self.n_threads
        cp.kv_unified = True  # one KV pool shared by all sequences (prefix sharing is free later)
        cp.swa_full = True  # a full-size sliding-window cache, so a sequence's KV can be partially removed
        cp.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, cp)
        if not self._ctx:
            raise EngineError("EIO", f"llama.cpp could not create a context of {cp.n_ctx} tokens "
                              f"({self.n_seq_max} sequences x {self.n_ctx_seq}): out of memory? "
                              "lower [llm] n_seq_max or n_ctx_seq")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

    def _find_chat_template(self) -> bytes:
        """The model's own chat template, else the built-in one of its architecture, else ChatML."""
        tmpl = llama_cpp.llama_model_chat_template(self._model, None)
        if tmpl:
            return tmpl
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_model_meta_val_str(self._model, b"general.architecture", buf, len(buf))
        arch = buf.value.decode() if n > 0 else "?"
        if arch in BUILTIN_CHAT_TEMPLATES:
            return BUILTIN_CHAT_TEMPLATES[arch]
        log.warning("engine: %s has no chat template and architecture %s has no built-in one; using ChatML",
                    self.model_name, arch)
        return b"chatml"

    def _free(self) -> None:
        """Free the batch, context and model (engine thread, after the loop)."""
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
        self._ctx = self._mem = None
        with self._model_lock:
            if self._model:
                llama_cpp.llama_model_free(self._model)
            self._model = self._vocab = None

    def _wait_for_work(self) -> bool:
        """Block (no CPU) until there is something to do; False when the engine is closing."""
        with self._lock:
            while not (self._closed or self._cancels or self._active or len(self._policy)):
                self._wake.wait()
            return not self._closed

    def _step(self) -> None:
        """One turn of the loop: cancellations, admission, one batch, one decode, sampling and retirement."""
        self._take_cancellations()
        self._admit()
        if not self._active:
            return
        in_batch = self._fill_batch()
        if self._decode(in_batch):
            self._sample(in_batch)

    def _take_cancellations(self) -> None:
        """Report ECANCELED for every request cancelled since the last step, freeing its sequence if it ran."""
        with self._lock:
            cancels, self._cancels = self._cancels, []
        for req in cancels:
            seq = next((s for s in self._active if s.req is req), None)
            if seq is not None:
                self._release(seq)
            self._finish(req, "error", EngineError("ECANCELED", "the request was cancelled"))

    def _admit(self) -> None:
        """Give free sequence slots to waiting requests, in the order the policy chooses."""
        while self._free_slots:
            with self._lock:
                req = self._policy.pop_next()
                if req is None:
                    return
                req._state = RUNNING
            try:
                sampler = self._make_sampler(req.params)
            except Exception:
                log.exception("engine: creating a sampler failed")
                sampler = None
            if not sampler:
                self._finish(req, "error", EngineError("EIO", "llama.cpp could not create a sampler"))
                continue
            seq = _Seq(req, heapq.heappop(self._free_slots), sampler, TextStream(req.params.stop))
            self._active.append(seq)

    def _make_sampler(self, p: SamplingParams):
        """A new C sampler chain for ``p``: greedy when temperature is 0, else top_k, top_p, temp, dist(seed)."""
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if p.temperature == 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        if p.top_k > 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(p.top_k))
        if p.top_p < 1:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(p.temperature))
        # 0xFFFFFFFF means "random" to llama.cpp, so seeds live in 0..2**32-2.
        seed = random.getrandbits(32) % 0xFFFFFFFF if p.seed is None else p.seed % 0xFFFFFFFF
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
        return chain

    def _fill_batch(self) -> list[_Seq]:
        """Fill the batch and return the sequences in it.

        First one row for every decoding sequence (its last sampled token, logits on), then chunks of prompts
        still being prefilled, in admission order, until ``n_batch`` rows; a prompt's last token alone gets
        logits.  Sets each sequence's ``n_queued`` (its rows) and ``row`` (where to sample; -1: not this step).
        """
        n = 0
        in_batch = []
        for seq in self._active:
            seq.row, seq.n_queued = -1, 0
            if not seq.prefilling:
                self._put(n, seq.sampled, seq.n_past, seq.seq_id, True)
                seq.row, seq.n_queued = n, 1
                n += 1
                in_batch.append(seq)
        for seq in self._active:
            if not seq.prefilling or n == self.n_batch:
                continue
            prompt = seq.req.tokens
            k = min(len(prompt) - seq.n_past, self.n_batch - n)
            for j in range(k):
                self._put(n + j, prompt[seq.n_past + j], seq.n_past + j, seq.seq_id, False)
            n += k
            seq.n_queued = k
            if seq.n_past + k == len(prompt):
                self._batch.logits[n - 1] = 1
                seq.row = n - 1
            in_batch.append(seq)
        self._batch.n_tokens = n
        return in_batch

    def _put(self, row: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        b = self._batch
        b.token[row] = token
        b.pos[row] = pos
        b.n_seq_id[row] = 1
        b.seq_id[row][0] = seq_id
        b.logits[row] = logits

    def _decode(self, in_batch: list[_Seq]) -> bool:
        """Decode the batch.  On success advance every sequence's position and return True; on failure fail
        the sequences in the batch with EIO (the engine goes on serving the others) and return False."""
        ret = llama_cpp.llama_decode(self._ctx, self._batch)
        if ret != 0:
            log.error("llama_decode failed (%d) on a batch of %d tokens", ret, self._batch.n_tokens)
            err = EngineError("EIO", f"llama_decode failed ({ret}); the request was dropped, retry it")
            for seq in in_batch:
                self._fail(seq, err)
            return False
        n_prompt = 0
        for seq in in_batch:
            if seq.prefilling:
                n_prompt += seq.n_queued
            seq.n_past += seq.n_queued
        with self._lock:
            self._stats["steps"] += 1
            self._stats["prompt_tokens"] += n_prompt
        return True

    def _sample(self, in_batch: list[_Seq]) -> None:
        """Sample the next token of every sequence that has logits this step, and retire the finished ones."""
        n_new = 0
        for seq in in_batch:
            if seq.row < 0:
                continue
            token = llama_cpp.llama_sampler_sample(seq.sampler, self._ctx, seq.row)
            if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                self._complete(seq, "stop")
                continue
            n_new += 1
            seq.n_generated += 1
            self._chunk(seq, seq.text.feed(self._piece(token)))
            if seq.text.stopped:
                self._complete(seq, "stop")
            elif seq.n_generated >= seq.req.params.max_tokens or seq.n_past + 1 >= self.n_ctx_seq:
                self._complete(seq, "length")  # n_past + 1: the prompt, the tokens fed, and this one
            else:
                seq.sampled = token
        with self._lock:
            self._stats["tokens_generated"] += n_new

    def _piece(self, token: int) -> bytes:
        """The bytes of ``token`` (control tokens render as nothing)."""
        buf = self._piece_buf
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            self._piece_buf = buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return ctypes.string_at(buf, max(n, 0))

    def _chunk(self, seq: _Seq, text: str) -> None:
        if text and seq.req.stream and not seq.req._cancelled:
            self._emit(seq.req, "chunk", {"text": text})

    def _complete(self, seq: _Seq, reason: str) -> None:
        """Retire a sequence that ended normally: flush its held-back text, free it, report done."""
        self._chunk(seq, seq.text.finish())
        if seq.text.stopped:
            reason = "stop"
        self._release(seq)
        usage = {"prompt_tokens": len(seq.req.tokens), "completion_tokens": seq.n_generated}
        self._finish(seq.req, "done", {"text": seq.text.text, "finish_reason": reason, "usage": usage})

    def _fail(self, seq: _Seq, err: EngineError) -> None:
        """Retire a sequence with an error."""
        self._release(seq)
        self._finish(seq.req, "error", err)

    def _release(self, seq: _Seq) -> None:
        """Free a sequence's KV cells, sampler and slot."""
        llama_cpp.llama_memory_seq_rm(self._mem, seq.seq_id, -1, -1)
        llama_cpp.llama_sampler_free(seq.sampler)
        self._active.remove(seq)
        heapq.heappush(self._free_slots, seq.seq_id)

    def _finish(self, req: Request, kind: str, payload) -> None:
        """Send a request's last event, once.  A cancelled request always reports ECANCELED, as ``cancel``
        promised, even if it completed or failed meanwhile."""
        with self._lock:
            if req._state == DONE:
                return
            req._state = DONE
            del self._pending[req.id]
            cancelled = req._cancelled
        if cancelled:
            kind, payload = "error", EngineError("ECANCELED", "the request was cancelled")
        self._emit(req, kind, payload)

    def _emit(self, req: Request, kind: str, payload) -> None:
        try:
            self._sink(req, kind, payload)
        except Exception:  # the sink is the caller's; its failure must not stop the engine
            log.exception("engine sink failed on %s event of request %d", kind, req.id)
