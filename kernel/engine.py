"""The LLM engine: many generations at once in one llama.cpp context (continuous batching).

Modelled on llama.cpp's ``examples/parallel`` and ``tools/server``.  One engine thread owns the model and the
context (a llama context must only ever be touched from one thread; ctypes releases the GIL while llama.cpp
computes, so the kernel's other threads keep running) and loops::

    wait until there is work
    take cancellations                  -> free their sequences, report ECANCELED
    ask the policy who runs             -> up to max_active pending requests, best first (kernel/scheduler.py)
    make them resident                  -> a sequence slot and KV cells each: reuse a cached prefix, restore an
                                           evicted snapshot, or prefill; evict others to make room
    fill one batch                      -> the next token of every decoding sequence, then prompt chunks
    llama_decode once
    sample each sequence from its row   -> its own C sampler chain; then retire finished sequences

Mechanism lives here: batch, decode, sample, slots, KV accounting, prefix reuse, free.  Which requests run is
the policy's choice (``fifo``, ``rr``, ``fair``); eviction and exact restore are ``kernel/context.py``'s.
Results go to the caller's sink, called from the engine thread.

Slots and memory.  The context has ``n_seq_max`` sequence slots sharing one KV pool of ``kv_size`` cells
(``kv_unified``).  A slot is *busy* (a pending request's sequence: running, or preempted and left out of the
batch), *cached* (an idle session: the KV of a finished generation, kept so that the owner's next request
that starts with the same tokens, e.g. the next turn of a chat, only computes what is new), or free.  A
request is admitted only when a slot and enough cells for its known tokens are free; otherwise the engine
evicts cached sessions (oldest first) and preempted sequences (least recently run first) to make room, and if
nothing can be evicted the request waits in the policy -- queued, never dropped.  Gemma 3's sliding-window
layers keep a full-size cache (``swa_full``) so that a sequence can be cut back to a prefix.

Prefix reuse.  A new request's prompt is matched against the KV the engine holds for the *same owner*
(cached sessions, running sequences, evicted sessions): the longest common prefix, at least ``MIN_REUSE``
tokens and never the last prompt token (its logits are needed), is reused -- taken over from a cached slot,
copied from a busy one with ``llama_memory_seq_cp`` (in a unified cache only metadata: the cells are shared),
or restored from a snapshot -- and ``usage.cached_tokens`` reports how many prompt tokens were not recomputed.
Reuse is per owner by default because it is a timing side channel: an agent whose prompt is answered faster
learns that someone else's prompt began the same way.  ``share_prefix=True`` (``[llm] share_prefix``) allows
it across owners, e.g. for a common system prompt among agents that trust one another.

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
restored cache has a different shape, and the same caveat applies (kernel/context.py).  Weights are
not repacked (``use_extra_bufts = False``): the repacked Q4_K kernels add one more such switch (at 4 rows) and
were slower here (35 vs 133 tok/s for 32 sequences).
"""
from __future__ import annotations

import codecs
import ctypes
import itertools
import json
import logging
import math
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import llama_cpp
import numpy as np

from kernel.context import MB, ContextManager, Snapshot
from kernel.grammar import SchemaError, check_grammar, check_schema
from kernel.scheduler import FifoPolicy, Policy, make_policy

log = logging.getLogger(__name__)

MAX_TOKENS_LIMIT = 4096  # ABI: max_tokens is 1..4096
MAX_STOP_SEQUENCES = 8  # ABI: stop is at most 8 non-empty strings
MIN_REUSE = 8  # a cached prefix shorter than this is recomputed rather than reused
CHAT_ROLES = ("system", "user", "assistant")
DEFAULT_MODEL = "default"  # the name of the model a request gets when it names none
# A model file without a chat template (a base model) gets its family's built-in llama.cpp template; llama.cpp
# itself would silently use ChatML, whose markers such a model has never seen.
BUILTIN_CHAT_TEMPLATES = {"gemma": b"gemma", "gemma2": b"gemma", "gemma3": b"gemma", "gemma3n": b"gemma"}
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data
DEFAULT_PREFILL_CHUNK = 64  # prompt tokens a step may carry while other sequences are decoding
GRAMMAR_CANDIDATES = 512  # a grammar-rejected token: first try the grammar on this many most likely tokens
SESSIONS_PER_OWNER = 4  # evicted idle sessions kept per owner (their snapshots share the swap budget)
DEFAULT_TOKEN_S = 0.002  # engine seconds a batch token is assumed to cost until a step has been measured
_REQUEST_IDS = itertools.count(1)  # shared by every engine: a request id names one request in the process


class EngineError(Exception):
    """An error with an ABI error code (docs/abi.md section 3): ``.code`` is e.g. ``"E2BIG"``, ``"EINVAL"``,
    ``"ECANCELED"``, ``"EIO"``, ``"ENOENT"``; ``str()`` is the message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
        self.usage: dict | None = None  # on a request's error event: what it computed before it ended

    def __repr__(self) -> str:
        return f"EngineError({self.code!r}, {self.message!r})"


@dataclass
class SamplingParams:
    """How to generate; the ABI arguments of ``llm.generate`` minus ``prompt``, ``stream`` and ``model``."""

    max_tokens: int = 128
    temperature: float = 0.0  # 0 => greedy
    top_k: int = 40  # 0 disables
    top_p: float = 0.95  # 1.0 disables
    seed: int | None = None  # None => random
    stop: list[str] = field(default_factory=list)
    json_schema: dict | None = None  # constrain the output to JSON matching this schema


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
    if p.json_schema is not None and not isinstance(p.json_schema, dict):
        raise EngineError("EINVAL", f"json_schema must be a JSON Schema object (a map) or nil, got {p.json_schema!r}")


def schema_grammar(schema: dict) -> str:
    """The GBNF grammar of JSON documents matching ``schema``; ``EngineError("EINVAL")`` if it cannot be
    converted (llama-cpp-python's converter supports most of JSON Schema draft 2020-12)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        check_schema(schema)  # bounds first: the converter and llama.cpp's parser recurse per repetition
        text = json_schema_to_gbnf(json.dumps(schema))
        check_grammar(text)
        return text
    except SchemaError as exc:
        raise EngineError("EINVAL", str(exc)) from None
    except Exception as exc:
        raise EngineError("EINVAL", f"json_schema cannot be turned into a grammar: {exc}") from None


# Request life cycle: WAITING (pending, never ran) -> RUNNING (the engine has started it: it has a sequence, which
# may be preempted or evicted meanwhile) -> DONE (the sink got done/error).
WAITING, RUNNING, DONE = "waiting", "running", "done"


class Request:
    """One generation, created by ``Engine.submit``.  The caller treats it as an opaque handle: ``id`` is unique
    in the process (across engines); ``owner``, ``tag``, ``key`` and ``priority`` are what the caller passed (``tag`` comes back
    untouched in events); ``model`` names the engine that serves it."""

    __slots__ = ("id", "owner", "tag", "key", "stream", "params", "tokens", "priority", "model", "_state",
                 "_cancelled", "_sampler", "_grammar", "_seq")

    def __init__(self, id: int, tokens: list[int], params: SamplingParams, owner, tag, stream: bool,
                 priority: int = 0, key=None, model: str = DEFAULT_MODEL):
        self.id = id
        self.owner = owner
        self.tag = tag
        self.key = key
        self.stream = stream
        self.params = params
        self.tokens = tokens  # the prompt (a text prompt's BOS included)
        self.priority = priority
        self.model = model
        self._state = WAITING  # guarded by Engine._lock
        self._cancelled = False  # guarded by Engine._lock
        self._sampler = None  # C sampler chain; made by submit, freed by the engine thread when the request ends
        self._grammar = None  # C grammar sampler (json_schema), or None
        self._seq = None  # engine thread: its _Seq once started

    def __repr__(self) -> str:
        return f"<Request {self.id} owner={self.owner!r} {self._state} prompt={len(self.tokens)}t>"


Sink = Callable[[Request, str, object], None]


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
            if self.engine._model is not None:
                _free_samplers(self.sampler, self.grammar)
        self.sampler = self.grammar = None
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
    """A started request's state inside the engine thread (only that thread touches it).

    ``tokens`` is everything that must be in the KV cache before the next sample: the prompt, then every
    generated token fed back.  The cache holds ``tokens[:n_past]`` while the sequence is resident (``slot``), and
    its snapshot holds as much while it is evicted (``snapshot``; None after a text eviction, which sets
    ``n_past`` to 0 so that everything is recomputed).  A decoding sequence has exactly one token left to feed.
    """

    req: Request
    sampler: object  # its llama_sampler chain (C pointer); kept across eviction, with its RNG state
    grammar: object  # its grammar sampler (C pointer) or None
    text: TextStream
    tokens: list[int]
    n_past: int = 0
    n_generated: int = 0  # completion tokens so far (an EOG token is not counted)
    n_cached: int = 0  # prompt tokens whose KV was reused instead of computed
    complete_from: int = 0  # sliding-window layers hold no cells below this position (see _restored)
    slot: "_Slot | None" = None
    snapshot: Snapshot | None = None
    last_ran: int = 0  # the step it last ran in
    turn: int = 0  # tokens sampled since it last became resident
    n_queued: int = 0  # tokens of this sequence in the current batch
    row: int = -1  # batch row whose logits to sample this step; -1: nothing to sample


@dataclass(eq=False)
class _Slot:
    """One llama sequence id.  Busy (``seq``), cached (``cache``: the tokens of an idle session's KV) or free."""

    seq_id: int
    seq: _Seq | None = None
    cache: list[int] | None = None
    owner: object = None  # the cached session's owner
    stamp: float = 0.0  # when the cached session was last used
    complete_from: int = 0  # the cached session's sliding-window floor (see Engine._restored)

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
class _Session:
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
    - ``"done"``, ``{"text", "finish_reason": "stop"|"length", "usage": {"prompt_tokens", "completion_tokens",
      "cached_tokens"}}``;
    - ``"error"``, an ``EngineError`` (``ECANCELED`` after cancel or close, ``EIO`` when decoding failed) whose
      ``usage`` holds what the request computed before it ended (same keys as ``done``'s; zeros if it never
      started), so that cancelled and failed work can be charged.

    Exactly one of done/error per request, always its last event.

    Sizes: ``n_seq_max`` sequence slots (running + preempted + cached sessions, at most 256); ``max_active``
    sequences per step (default: all slots; ``n_batch`` must be at least this); ``kv_size`` KV cells in all
    (default ``n_ctx_seq * max_active``; at least ``n_ctx_seq``); ``n_ctx_seq`` tokens per sequence (prompt +
    output).  ``policy``: a ``kernel.scheduler.Policy`` or its name (default FIFO).  Eviction: snapshots in RAM
    up to ``swap_ram_mb``, then in ``swap_dir`` up to ``swap_disk_mb``; ``snapshots=False`` always recomputes.
    ``session_cache=False`` frees a finished request's KV instead of keeping it for its owner's next request.
    ``prefill_chunk``: prompt tokens one step may carry while other sequences decode (chunked prefill).

    Service.  The policy is charged, per request, the batch tokens it fed each step plus, in tokens of engine
    time (seconds over the measured cost of a batch token), what its grammar-constrained sampling and its
    ``prepare`` cost: an agent pays for the engine time its requests take, not only for their tokens.
    """

    kind = "local"  # llm.models: a model the kernel runs itself (a remote core's is "openai": kernel/remote.py)

    def __init__(self, model_path: str, sink: Sink, *, n_ctx_seq: int = 2048, n_seq_max: int = 16,
                 n_threads: int | None = None, n_batch: int = 512, policy: Policy | str | None = None,
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
        if isinstance(policy, str):
            try:
                policy = make_policy(policy, rr_slice=rr_slice)
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
        self._policy = policy if policy is not None else FifoPolicy()
        self._ctxmgr = ContextManager(ram_budget=swap_ram_mb * MB, disk_budget=swap_disk_mb * MB,
                                      swap_dir=swap_dir, enabled=snapshots)

        # Shared between callers and the engine thread, guarded by _lock.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: dict[int, Request] = {}  # every request not DONE, by id
        self._by_key: dict[object, Request] = {}  # pending requests submitted with a key
        self._cancels: list[Request] = []  # cancelled, not yet reported by the engine thread
        self._forget: list[object] = []  # owners whose cached sessions the engine thread must drop
        self._scopes: dict = {}  # owner -> its prefix-sharing scope (owners of one scope reuse each other's KV)
        self._closed = False
        self._stats = {"active": 0, "steps": 0, "tokens_generated": 0, "prompt_tokens": 0, "cached_tokens": 0,
                       "prefix_hits": 0, "resident": 0, "cached_sessions": 0, "kv_cells_used": 0}

        # Set by the engine thread while loading; read-only until freed.  tokenize/render_chat/submit use them on
        # the caller's thread under _model_lock, which the engine thread takes to free them.
        self._model_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loaded = threading.Event()
        self._load_error: EngineError | None = None
        self._model = None
        self._vocab = None
        self._n_vocab = 0
        self._n_swa = 0  # the model's sliding window (0: none)
        self._chat_template: bytes | None = None

        # Engine thread only.
        self._ctx = None
        self._mem = None
        self._batch = None
        self._slots = [_Slot(i) for i in range(n_seq_max)]
        self._sessions: list[_Session] = []  # evicted idle sessions, oldest first
        self._running: set[Request] = set()  # who ran in the last step (the policy's hysteresis)
        self._step_no = 0
        self._piece_buf = ctypes.create_string_buffer(256)
        self._cur = None  # numpy llama_token_data[n_vocab] for constrained sampling
        self._vocab_ids = None  # numpy 0..n_vocab-1
        self._one = np.zeros(1, _TOKEN_DATA)
        self._top = np.zeros(GRAMMAR_CANDIDATES, _TOKEN_DATA)
        self._token_s = DEFAULT_TOKEN_S  # engine seconds one batch token costs (a moving average of steps)

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
            self._thread = threading.Thread(target=self._run, name=f"llm-engine-{self.name}", daemon=True)
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            self._thread.join()
            raise self._load_error
        log.info("engine %s: %s loaded; %d slots, %d active, %d KV cells, %d tokens a sequence, batch %d, "
                 "%d threads, %s scheduler", self.name, self.model_name, self.n_seq_max, self.max_active,
                 self.kv_size, self.n_ctx_seq, self.n_batch, self.n_threads, self._policy.name)

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
               stream: bool = False, priority: int = 0, key=None, scope=None) -> Request:
        """Queue a generation of ``prompt`` (text, tokenized here with BOS and special tokens; or token ids used
        as given) and return its handle at once; its events go to the sink.  A queued request waits, never
        dropped, until the policy runs it and a slot and KV cells are free.  ``prepare`` then ``enqueue``.

        ``owner`` (an agent id) is whom the fair policy accounts and whose cached prefixes the request may reuse;
        ``scope`` (hashable, fixed for an owner's life) widens that reuse to every owner of the same scope (a
        privilege group, a fleet: docs/engine.md, "Prefix sharing");
        ``priority`` weights the fair policy (the owner's group priority); ``key`` (hashable) lets
        ``cancel_key`` find the request.  Raises ``EINVAL`` (bad params, token ids or json_schema), ``E2BIG``
        (the prompt leaves no room for one token in the per-sequence context), ``ECANCELED`` (the engine is
        closed), ``EIO`` (not started).
        """
        return self.enqueue(self.prepare(prompt, params), owner=owner, tag=tag, stream=stream, priority=priority,
                            key=key, scope=scope)

    def prepare(self, prompt: str | list[int] | None, params: SamplingParams, *,
                messages: list[dict] | None = None) -> "Prepared":
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
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self._n_vocab for t in tokens):
                raise EngineError("EINVAL", f"prompt token ids must be integers in 0..{self._n_vocab - 1}")
        if len(tokens) + 1 > self.n_ctx_seq:
            raise EngineError("E2BIG", f"prompt is {len(tokens)} tokens; this model's per-sequence context is "
                              f"{self.n_ctx_seq} tokens (prompt + output), so a prompt may have at most "
                              f"{self.n_ctx_seq - 1}: shorten it")
        params = SamplingParams(params.max_tokens, float(params.temperature), params.top_k, float(params.top_p),
                                params.seed, list(params.stop), params.json_schema)  # a private copy
        with self._model_lock:
            self._require_model()
            sampler, grammar = self._make_samplers(params, grammar_text)
        return Prepared(self, tokens, params, sampler, grammar, time.thread_time() - started)

    def enqueue(self, prep: "Prepared", *, max_tokens: int | None = None, owner=None, tag=None,
                stream: bool = False, priority: int = 0, key=None, scope=None) -> Request:
        """Queue a request ``prepare`` made (by this engine), with at most ``max_tokens`` (default: its params')
        and return its handle; arguments as ``submit``.  The fair policy charges the owner for what preparing
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
                req = Request(next(_REQUEST_IDS), prep.tokens, prep.params, owner, tag, bool(stream), int(priority),
                              key, self.name)
                req._sampler, req._grammar = sampler, grammar
                if scope is not None and owner is not None:
                    self._scopes[owner] = scope
                self._pending[req.id] = req
                if key is not None:
                    self._by_key[key] = req
                self._policy.add(req)
                self._policy.charge(req, self._token_equivalent(prep.cost_s))
                self._wake.notify()
        except BaseException:
            _free_samplers(sampler, grammar)
            raise
        return req

    def cancel(self, request: Request) -> bool:
        """Cancel ``request`` if it is still pending (waiting or running) and return True; its sink then gets
        ``"error"`` ``ECANCELED`` (whatever else was under way) and the engine thread frees its sequence.
        False when it had already ended or was cancelled before."""
        with self._lock:
            return self._cancel_locked(request)

    def cancel_key(self, key) -> bool:
        """Cancel the pending request submitted with ``key``; False when there is none (it ended, or never was)."""
        with self._lock:
            req = self._by_key.get(key)
            return req is not None and self._cancel_locked(req)

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
        requests that reused cached KV), and the context manager's ``evictions``, ``restores``,
        ``text_evictions``, ``snapshots_ram``, ``snapshots_disk``, ``swap_ram_bytes``, ``swap_disk_bytes``..."""
        with self._lock:
            out = dict(self._stats)
            out["waiting"] = max(0, len(self._policy) - out["active"])
        out.update(self._ctxmgr.stats())
        out["scheduler"] = self._policy.name
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
        if not self._loaded.is_set() or self._model is None:
            raise EngineError("EIO", "the LLM engine is not running (start() it first)")

    def _cancel_locked(self, req: Request) -> bool:
        if req._state == DONE or req._cancelled:
            return False
        req._cancelled = True
        self._policy.remove(req)
        self._cancels.append(req)
        self._wake.notify()
        return True

    def _make_samplers(self, p: SamplingParams, grammar_text: str | None):
        """A new C sampler chain for ``p`` (greedy when temperature is 0, else top_k, top_p, temp, dist(seed)) and
        the grammar sampler of ``grammar_text`` (or None).  Call with ``_model_lock`` held."""
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if not chain:
            raise EngineError("EIO", "llama.cpp could not create a sampler")
        if p.temperature == 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            if p.top_k > 0:
                llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(p.top_k))
            if p.top_p < 1:
                llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(p.temperature))
            # 0xFFFFFFFF means "random" to llama.cpp, so seeds live in 0..2**32-2.
            seed = random.getrandbits(32) % 0xFFFFFFFF if p.seed is None else p.seed % 0xFFFFFFFF
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
        if grammar_text is None:
            return chain, None
        grammar = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar_text.encode(), b"root")
        if not grammar:
            llama_cpp.llama_sampler_free(chain)
            raise EngineError("EINVAL", "json_schema: llama.cpp rejected the grammar made from it")
        return chain, grammar

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
        finally:
            with self._lock:  # closed, or dying of a bug: either way nothing may wait forever
                self._closed = True
                for req in list(self._pending.values()):
                    self._cancel_locked(req)
            try:
                self._take_cancellations()
            finally:
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
        self._n_swa = max(0, llama_cpp.llama_model_n_swa(self._model))
        self._chat_template = self._find_chat_template()
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
        self._ctx = llama_cpp.llama_init_from_model(self._model, cp)
        if not self._ctx:
            raise EngineError("EIO", f"llama.cpp could not create a context of {cp.n_ctx} KV cells and "
                              f"{self.n_seq_max} sequences: out of memory? lower [llm] kv_size or n_seq_max")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._ctxmgr.attach(self._ctx, self._mem)

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
        """Free the snapshots, batch, context and model (engine thread, after the loop)."""
        self._ctxmgr.clear()
        self._sessions.clear()
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
            while not (self._closed or self._cancels or self._forget or len(self._policy)):
                self._wake.wait()
            return not self._closed

    def _step(self) -> None:
        """One turn of the loop: cancellations, the policy's choice, residency, one batch, decode, sampling."""
        self._take_cancellations()
        with self._lock:
            order = self._policy.pick(self.max_active, self._running)
            # A minimum quantum, whatever the policy says: a sequence made resident runs until it has sampled a
            # token, so that a preemption can never undo a prefill before it bore fruit (a text eviction would
            # recompute it, again and again).
            unfinished = [r for r in self._running if r._state == RUNNING and not r._cancelled
                          and r._seq.slot is not None and r._seq.turn == 0]
        if unfinished:
            unfinished.sort(key=lambda r: r.id)
            order = (unfinished + [r for r in order if r not in set(unfinished)])[: self.max_active]
        plan = self._plan(order)
        rows = self._fit_step(plan)
        self._running = {seq.req for seq, _ in rows}
        if rows:
            self._step_no += 1
            self._fill_batch(rows)
            if self._decode(rows):
                self._sample(rows)
        with self._lock:
            self._stats["active"] = sum(req._state != DONE for req in self._running)
            self._stats["resident"] = sum(s.seq is not None for s in self._slots)
            self._stats["cached_sessions"] = sum(s.cache is not None for s in self._slots) + len(self._sessions)
            self._stats["kv_cells_used"] = self._kv_used()

    # -- cancellation --

    def _take_cancellations(self) -> None:
        """Report ECANCELED for every request cancelled since the last step, freeing its sequence; drop the
        cached sessions of owners that are gone."""
        with self._lock:
            cancels, self._cancels = self._cancels, []
            forget, self._forget = self._forget, []
        for req in cancels:
            if req._seq is not None:
                self._retire(req._seq, keep=False)
            self._finish(req, "error", EngineError("ECANCELED", "the request was cancelled"))
        for owner in forget:
            with self._lock:
                self._scopes.pop(owner, None)
            for slot in self._slots:
                if slot.cache is not None and slot.owner == owner:
                    self._clear_slot(slot)
            for sess in [s for s in self._sessions if s.owner == owner]:
                self._sessions.remove(sess)
                self._ctxmgr.discard(sess.snapshot)

    # -- residency: slots, KV cells, prefix reuse, eviction --

    def _plan(self, order: list[Request]) -> list[_Seq]:
        """Make the policy's choice resident, best first; stop at the first that cannot get room."""
        plan: list[_Seq] = []
        wanted = set(order)
        for req in order:
            seq = req._seq or self._start(req)
            if seq.slot is None and not self._make_resident(seq, plan, wanted):
                if plan:
                    break  # it waits (queued, never dropped) until room frees up
                # The best request cannot get room with everything else evicted: only a bug gets here.
                self._fail(seq, EngineError("EIO", "the LLM engine could not make room for this request"))
                continue
            plan.append(seq)
        return plan

    def _start(self, req: Request) -> _Seq:
        with self._lock:
            req._state = RUNNING
        req._seq = _Seq(req, req._sampler, req._grammar, TextStream(req.params.stop), list(req.tokens))
        return req._seq

    def _kv_used(self) -> int:
        return sum(slot.cells for slot in self._slots)

    def _make_resident(self, seq: _Seq, plan: list[_Seq], wanted: set) -> bool:
        """Give ``seq`` a slot and its KV: restore its snapshot, or reuse a cached prefix and leave the rest to
        prefill.  Evicts what the step does not need to make room; False when it cannot."""
        keep = {s.slot for s in plan}
        need = len(seq.tokens) + 1  # cells once its known tokens are in, plus the next one
        if seq.snapshot is not None:
            if not self._free_up(True, max(need, seq.snapshot.n_tokens), keep, wanted):
                return False
            slot = self._attach(seq)
            if self._ctxmgr.restore(seq.snapshot, slot.seq_id):
                seq.complete_from = self._restored(seq.complete_from, seq.snapshot.n_tokens)
            else:
                seq.n_past, seq.complete_from = 0, 0  # recompute (the text fallback)
            seq.snapshot = None
            return True
        p, src = self._find_prefix(seq) if seq.n_past == 0 else (0, None)
        if isinstance(src, _Slot) and src.cache is not None:  # take over an idle session's slot
            if not self._free_up(False, need - src.cells, keep | {src}, wanted):
                return False
            llama_cpp.llama_memory_seq_rm(self._mem, src.seq_id, p, -1)
            seq.complete_from = src.complete_from
            src.cache = src.owner = None
            self._attach(seq, src)
        elif isinstance(src, _Slot):  # share the prefix of a busy sequence
            if not self._free_up(True, need, keep | {src}, wanted):
                return False
            slot = self._attach(seq)
            if self.kv_unified:  # metadata only: the cells are shared
                llama_cpp.llama_memory_seq_cp(self._mem, src.seq_id, slot.seq_id, 0, p)
            else:  # across streams llama.cpp copies a whole stream (~18 KB a cell), then we cut it back
                llama_cpp.llama_memory_seq_cp(self._mem, src.seq_id, slot.seq_id, -1, -1)
                llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, p, -1)
            seq.complete_from = src.floor()
        elif isinstance(src, _Session):  # restore an evicted idle session, then cut it back to the prefix
            if not self._free_up(True, max(need, len(src.tokens)), keep, wanted):
                return False
            if src in self._sessions:  # making room may have dropped it (_keep_session)
                self._sessions.remove(src)
            slot = self._attach(seq)
            if src.snapshot.dropped:  # making room dropped it: prefill after all
                p = 0
            elif self._ctxmgr.restore(src.snapshot, slot.seq_id):
                llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, p, -1)
                seq.complete_from = self._restored(src.complete_from, len(src.tokens))
            else:
                p = 0
        else:
            if not self._free_up(True, need, keep, wanted):
                return False
            self._attach(seq)
        seq.n_past = p
        if p and seq.n_generated == 0:
            seq.n_cached = p
            with self._lock:
                self._stats["cached_tokens"] += p
                self._stats["prefix_hits"] += 1
        return True

    def _find_prefix(self, seq: _Seq) -> tuple[int, object]:
        """The longest prefix of ``seq.tokens`` whose KV this engine holds for the same owner, or an owner of the
        same scope (any owner with ``share_prefix``): ``(length, source)``, source an idle slot, a busy slot or an evicted session;
        ``(0, None)`` below ``MIN_REUSE`` tokens.  Never the whole of ``tokens``: the last one must be computed
        for its logits."""
        limit = len(seq.tokens) - 1
        owner = seq.req.owner
        scopes = self._scopes  # written under the lock by enqueue; one dict lookup each is atomic (the GIL)
        scope = scopes.get(owner)
        best, src = MIN_REUSE - 1, None
        self._sessions = [s for s in self._sessions if not s.snapshot.dropped]
        candidates = [(s, s.owner) for s in self._slots if s.cache is not None]  # cheapest source first
        candidates += [(s, s.seq.req.owner) for s in self._slots if s.seq is not None and s.seq is not seq]
        candidates += [(s, s.owner) for s in self._sessions]
        for cand, cand_owner in candidates:
            if cand_owner != owner and not self.share_prefix and (scope is None or scopes.get(cand_owner) != scope):
                continue
            if isinstance(cand, _Session):
                tokens, floor = cand.tokens, self._restored(cand.complete_from, len(cand.tokens))
            else:
                tokens, floor = cand.kv_tokens(), cand.floor()
            p = min(common_prefix(tokens, seq.tokens), limit)
            if floor and p < floor + self._n_swa - 1:
                continue  # the window of the first new token reaches below what the sliding layers hold
            if p > best:
                best, src = p, cand
        return (best, src) if src is not None else (0, None)

    def _restored(self, floor: int, n_tokens: int) -> int:
        """The sliding-window floor of a sequence restored from a snapshot of ``n_tokens`` cells.

        llama.cpp saves a sequence without the sliding-window layers' cells that its next token can no longer
        see (positions below ``n_tokens - n_swa``).  Continuing the sequence is exact, but a prefix of it is
        reusable only if the first new token's window stays above that floor: ``p >= floor + n_swa - 1``."""
        return max(floor, n_tokens - self._n_swa) if self._n_swa else 0

    def _free_up(self, need_slot: bool, cells: int, keep: set, wanted: set) -> bool:
        """Evict until a slot is free (if ``need_slot``) and ``cells`` more KV cells fit, never touching the
        slots in ``keep``; False when nothing is left to evict."""
        while True:
            if (not need_slot or any(s.free for s in self._slots)) and self._kv_used() + cells <= self.kv_size:
                return True
            victim = self._victim(keep, wanted)
            if victim is None:
                return False
            self._evict(victim)

    def _victim(self, keep: set, wanted: set) -> _Slot | None:
        """What to evict first: the oldest idle session, then the preempted sequence the policy does not want
        now that ran least recently, then one it wants."""
        cached = [s for s in self._slots if s.cache is not None and s not in keep]
        if cached:
            return min(cached, key=lambda s: s.stamp)
        busy = [s for s in self._slots if s.seq is not None and s not in keep]
        if busy:
            return min(busy, key=lambda s: (s.seq.req in wanted, s.seq.last_ran))
        return None

    def _evict(self, slot: _Slot) -> None:
        """Snapshot a slot's KV (kernel/context.py) and free the slot."""
        if slot.seq is not None:
            seq = slot.seq
            seq.snapshot = self._ctxmgr.evict(slot.seq_id, seq.n_past)
            if seq.snapshot is None:
                seq.n_past = 0  # its tokens are recomputed on resume
            seq.slot = slot.seq = None
        else:
            snap = self._ctxmgr.evict(slot.seq_id, len(slot.cache), droppable=True)
            if snap is not None:
                self._keep_session(_Session(slot.owner, slot.cache, snap, slot.complete_from))
            slot.cache = slot.owner = None

    def _keep_session(self, sess: "_Session") -> None:
        """Keep an evicted idle session, and at most ``SESSIONS_PER_OWNER`` of its owner's (the oldest go): one
        agent's stream of one-off requests must not fill the swap budget that every agent's sessions share."""
        self._sessions.append(sess)
        mine = [s for s in self._sessions if s.owner == sess.owner]
        for old in mine[:-SESSIONS_PER_OWNER]:
            self._sessions.remove(old)
            old.snapshot.dropped = True  # a request about to restore it (_make_resident) prefills instead
            self._ctxmgr.discard(old.snapshot)

    def _attach(self, seq: _Seq, slot: _Slot | None = None) -> _Slot:
        slot = slot or next(s for s in self._slots if s.free)
        slot.seq, seq.slot = seq, slot
        seq.turn = 0
        return slot

    def _clear_slot(self, slot: _Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
        slot.cache = slot.owner = None
        slot.complete_from = 0
        if slot.seq is not None:
            slot.seq.slot = None
            slot.seq = None

    # -- one batch --

    def _fit_step(self, plan: list[_Seq]) -> list[tuple[_Seq, int]]:
        """The rows of this step, ``[(seq, n_tokens)]``: one for every decoding sequence, then prompt chunks in
        the plan's order until ``n_batch`` -- or, while any sequence is decoding, until ``prefill_chunk``
        prompt tokens (chunked prefill: a long prompt must not stall the streams around it for a whole
        ``n_batch`` step); evicting idle and preempted sequences, and then leaving the least preferred of the
        plan out, until the step's new tokens fit the KV pool."""
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
            if self._kv_used() + n <= self.kv_size or not plan:
                return rows
            victim = self._victim({s.slot for s in plan}, set())
            if victim is not None:
                self._evict(victim)
            else:
                plan.pop()  # stays resident (preempted); evictable on the next turn of this loop

    def _fill_batch(self, rows: list[tuple[_Seq, int]]) -> None:
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

    def _decode(self, rows: list[tuple[_Seq, int]]) -> bool:
        """Decode the batch.  On success advance every sequence, charge the policy and return True.  When the
        KV pool has no room after all, evict and let the next step retry; on any other failure fail the
        sequences in the batch with EIO (the engine goes on serving the others).  False: nothing to sample."""
        started = time.perf_counter()
        ret = llama_cpp.llama_decode(self._ctx, self._batch)
        if ret == 1:  # no KV slot: the pool is fragmented or our count is off; make room, retry next step
            log.warning("engine: llama_decode found no KV room for %d tokens; evicting", self._batch.n_tokens)
            victim = self._victim(set(), set()) if len(rows) > 1 else None
            if victim is not None:
                self._evict(victim)
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
        self._token_s += 0.1 * ((time.perf_counter() - started) / n - self._token_s)
        with self._lock:
            self._stats["steps"] += 1
            self._stats["prompt_tokens"] += n_prompt
            for seq, k in rows:
                self._policy.charge(seq.req, k)
        return True

    def _token_equivalent(self, seconds: float) -> float:
        """``seconds`` of engine time in batch tokens (what the policies count service in)."""
        return seconds / self._token_s if seconds > 0 else 0.0

    def _sample(self, rows: list[tuple[_Seq, int]]) -> None:
        """Sample the next token of every sequence that has logits this step, and retire the finished ones."""
        n_new = 0
        for seq, _ in rows:
            if seq.row < 0:
                continue
            if seq.grammar is None:
                token = self._sample_one(seq)
            else:  # constrained sampling can cost many steps' time: charged to its owner as tokens
                started = time.perf_counter()
                token = self._sample_one(seq)
                cost = self._token_equivalent(time.perf_counter() - started)
                with self._lock:
                    self._policy.charge(seq.req, cost)
            seq.turn += 1
            if token < 0 or llama_cpp.llama_vocab_is_eog(self._vocab, token):
                self._complete(seq, "stop")
                continue
            n_new += 1
            seq.n_generated += 1
            self._chunk(seq, seq.text.feed(self._piece(token)))
            if seq.text.stopped:
                self._complete(seq, "stop")
            elif seq.n_generated >= seq.req.params.max_tokens or len(seq.tokens) + 1 >= self.n_ctx_seq:
                self._complete(seq, "length")  # len + 1: the prompt, the tokens fed, and this one
            else:
                seq.tokens.append(token)
        with self._lock:
            self._stats["tokens_generated"] += n_new

    def _sample_one(self, seq: _Seq) -> int:
        """The next token from the sequence's row: its C sampler chain, constrained by its grammar if any."""
        if seq.grammar is None:
            return llama_cpp.llama_sampler_sample(seq.sampler, self._ctx, seq.row)
        # As llama.cpp's common_sampler: sample unconstrained, and only if the grammar rejects that token sample
        # again under the grammar -- first among the GRAMMAR_CANDIDATES most likely tokens (about 1 ms), and only
        # if it allows none of those over the whole vocabulary (~50-250 ms for 262k tokens, during which every
        # other sequence of the batch waits).  Greedy choices are exactly those of the full-vocabulary
        # pass; a sampled one is drawn from the most likely allowed tokens, as under top_k = GRAMMAR_CANDIDATES.
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, seq.row), shape=(self._n_vocab,))
        token = self._apply(seq.sampler, logits)
        if token < 0 or not self._allows(seq.grammar, token):
            token = self._apply_top(seq.sampler, logits, seq.grammar)
        if token < 0:
            token = self._apply(seq.sampler, logits, seq.grammar)
        if token >= 0:
            llama_cpp.llama_sampler_accept(seq.grammar, token)
            llama_cpp.llama_sampler_accept(seq.sampler, token)
        return token

    def _allows(self, grammar, token: int) -> bool:
        """Whether ``grammar`` accepts ``token`` next (it leaves a lone candidate's logit finite)."""
        one = self._one
        one["id"][0], one["logit"][0], one["p"][0] = token, 0.0, 0.0
        single = llama_cpp.llama_token_data_array(one.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)),
                                                  1, -1, False)
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(single))
        return not math.isinf(single.data[0].logit)

    def _apply(self, chain, logits, grammar=None) -> int:
        """Apply ``grammar`` (if any) then ``chain`` to a candidate array of every token; the selected token, or
        -1 when nothing is selectable."""
        if self._cur is None:
            self._cur = np.zeros(self._n_vocab, _TOKEN_DATA)
            self._vocab_ids = np.arange(self._n_vocab, dtype=np.int32)
        cur = self._cur
        cur["id"] = self._vocab_ids
        cur["logit"] = logits
        cur["p"] = 0.0
        arr = llama_cpp.llama_token_data_array(cur.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)),
                                               self._n_vocab, -1, False)
        return self._select(arr, chain, grammar)

    @staticmethod
    def _select(arr, chain, grammar) -> int:
        """Apply ``grammar`` (if any) then ``chain`` to the candidates ``arr``: the token selected, or -1 when
        none is selectable."""
        if grammar is not None:
            llama_cpp.llama_sampler_apply(grammar, ctypes.byref(arr))
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(arr))
        if not 0 <= arr.selected < arr.size or math.isinf(arr.data[arr.selected].logit):
            return -1
        return int(arr.data[arr.selected].id)

    def _apply_top(self, chain, logits, grammar) -> int:
        """As ``_apply`` with ``grammar``, over the ``GRAMMAR_CANDIDATES`` tokens of highest logit only."""
        top = self._top
        if self._n_vocab <= len(top):
            return -1  # a small vocabulary: the whole-vocabulary pass is as cheap
        ids = np.argpartition(logits, -len(top))[-len(top):]
        top["id"] = ids
        top["logit"] = logits[ids]
        top["p"] = 0.0
        arr = llama_cpp.llama_token_data_array(top.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)),
                                               len(top), -1, False)
        return self._select(arr, chain, grammar)

    def _piece(self, token: int) -> bytes:
        """The bytes of ``token`` (control tokens render as nothing)."""
        buf = self._piece_buf
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            self._piece_buf = buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return ctypes.string_at(buf, max(n, 0))

    # -- retirement --

    def _chunk(self, seq: _Seq, text: str) -> None:
        if text and seq.req.stream and not seq.req._cancelled:
            self._emit(seq.req, "chunk", {"text": text})

    def _complete(self, seq: _Seq, reason: str) -> None:
        """Retire a sequence that ended normally: flush its held-back text, keep its KV as its owner's cached
        session, report done."""
        self._chunk(seq, seq.text.finish())
        if seq.text.stopped:
            reason = "stop"
        self._retire(seq, keep=self.session_cache)
        usage = {"prompt_tokens": len(seq.req.tokens), "completion_tokens": seq.n_generated,
                 "cached_tokens": seq.n_cached}
        self._finish(seq.req, "done", {"text": seq.text.text, "finish_reason": reason, "usage": usage})

    def _fail(self, seq: _Seq, err: EngineError) -> None:
        """Retire a sequence with an error."""
        self._retire(seq, keep=False)
        self._finish(seq.req, "error", err)

    def _retire(self, seq: _Seq, keep: bool) -> None:
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
            self._ctxmgr.discard(seq.snapshot)
            seq.snapshot = None

    def _reset(self, err: EngineError) -> None:
        """After a failed step: fail every started request with ``err``, clear the KV cache and every snapshot.
        Requests that never started stay queued."""
        with self._lock:
            started = [r for r in self._pending.values() if r._seq is not None]
        for slot in self._slots:
            slot.seq = slot.cache = slot.owner = None
        try:
            llama_cpp.llama_memory_clear(self._mem, True)
        except Exception:
            log.exception("engine: clearing the KV cache failed")
        for sess in self._sessions:
            self._ctxmgr.discard(sess.snapshot)
        self._sessions.clear()
        for req in started:
            req._seq.slot = None
            if req._seq.snapshot is not None:
                self._ctxmgr.discard(req._seq.snapshot)
                req._seq.snapshot = None
            self._finish(req, "error", err)
        self._running = set()

    def _finish(self, req: Request, kind: str, payload) -> None:
        """Send a request's last event, once, and free its samplers.  A cancelled request always reports
        ECANCELED, as ``cancel`` promised, even if it completed or failed meanwhile."""
        with self._lock:
            if req._state == DONE:
                return
            req._state = DONE
            del self._pending[req.id]
            if req.key is not None and self._by_key.get(req.key) is req:
                del self._by_key[req.key]
            self._policy.remove(req)
            cancelled = req._cancelled
        _free_samplers(req._sampler, req._grammar)
        req._sampler = req._grammar = None
        if cancelled:
            kind, payload = "error", EngineError("ECANCELED", "the request was cancelled")
        if kind == "error" and payload.usage is None:
            payload = EngineError(payload.code, payload.message)  # a private copy: errors are shared by rows
            payload.usage = _usage_so_far(req)
        self._emit(req, kind, payload)

    def _emit(self, req: Request, kind: str, payload) -> None:
        try:
            self._sink(req, kind, payload)
        except Exception:  # the sink is the caller's; its failure must not stop the engine
            log.exception("engine sink failed on %s event of request %d", kind, req.id)


def _usage_so_far(req: Request) -> dict:
    """What a request computed before it ended in an error, to be charged like a finished one: prompt tokens
    whose KV it computed or reused (none if it never started), tokens generated, prompt tokens reused."""
    seq = req._seq
    if seq is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
    return {"prompt_tokens": min(seq.n_past, len(req.tokens)), "completion_tokens": seq.n_generated,
            "cached_tokens": seq.n_cached}


def _free_samplers(*samplers) -> None:
    for s in samplers:
        if s:
            llama_cpp.llama_sampler_free(s)


def kv_unified(llm) -> bool:
    """The KV layout of ``[llm]``: ``auto`` is one pool when agents share prefixes (a shared prefix is then
    shared cells, not copies) and a stream per slot when they do not (each sequence's attention then walks its
    own cells only, not every sequence's: 1.9x faster on P0 per agent, docs/engine.md "KV layout")."""
    if llm.kv_layout == "auto":
        return llm.share_prefix != "agent"
    return llm.kv_layout == "unified"


class Engines:
    """Several cores: one ``Engine`` per model, each with its own thread, context and scheduler.  Requests name
    a model (``model=NAME``) or get the default one; an unknown name is ``ENOENT``.  The kernel talks to this
    the way it would to one engine: cancelling an owner or a key reaches every engine."""

    def __init__(self, engines: dict[str, Engine], default: str = DEFAULT_MODEL):
        if default not in engines:
            raise EngineError("EINVAL", f"default model {default!r} is not among {sorted(engines)}")
        self._engines = dict(engines)
        self.default = default

    @classmethod
    def from_config(cls, llm, models: dict, model_path: str, sink: Sink, swap_dir: str | None = None) -> "Engines":
        """Engines for the kernel's config: ``default`` on ``model_path`` with the ``[llm]`` section ``llm``, and
        one per ``[models.NAME]`` (``models``: name -> section with ``path`` and overrides, 0 = as ``[llm]``)."""
        def make(name: str, path: str, over=None) -> Engine:
            def pick(key):
                value = getattr(over, key, 0) if over is not None else 0
                return value or getattr(llm, key)
            return Engine(path, sink, name=name, n_ctx_seq=pick("n_ctx_seq"), n_seq_max=pick("n_seq_max"),
                          n_threads=llm.threads or None, n_batch=pick("n_batch"), policy=llm.scheduler,
                          max_active=min(pick("max_active"), pick("n_seq_max")), kv_size=pick("kv_size") or None,
                          kv_unified=kv_unified(llm),
                          rr_slice=llm.rr_slice, swap_ram_mb=llm.swap_ram_mb, swap_disk_mb=llm.swap_disk_mb,
                          swap_dir=os.path.join(swap_dir, name) if swap_dir else None, snapshots=llm.snapshots,
                          share_prefix=llm.share_prefix == "all", prefill_chunk=llm.prefill_chunk)

        from kernel.remote import RemoteCore  # an OpenAI-compatible server as a core (docs/remote.md)

        engines = {DEFAULT_MODEL: make(DEFAULT_MODEL, model_path)}
        for name, section in models.items():
            engines[name] = (RemoteCore.from_config(name, section, llm, sink) if section.kind == "openai"
                             else make(name, section.path, section))
        return cls(engines, llm.default_model or DEFAULT_MODEL)

    @property
    def names(self) -> list[str]:
        return list(self._engines)

    @property
    def model_name(self) -> str:
        """The default model file's basename, and the other models' names (for logs)."""
        others = [n for n in self._engines if n != self.default]
        main = self._engines[self.default].model_name
        return main + (f" (+ models {', '.join(others)})" if others else "")

    def get(self, model: str | None = None) -> Engine:
        """The engine serving ``model`` (None: the default); ``EngineError("ENOENT")`` for an unknown name."""
        engine = self._engines.get(self.default if model is None else model)
        if engine is None:
            raise EngineError("ENOENT", f"no model named {model!r}; this kernel serves {', '.join(self._engines)}")
        return engine

    def start(self) -> None:
        """Start every engine; if one fails, close them all and raise its error."""
        try:
            for engine in self._engines.values():
                engine.start()
        except EngineError:
            self.close()
            raise

    def tokenize(self, text: str, *, model: str | None = None, **kw) -> list[int]:
        return self.get(model).tokenize(text, **kw)

    def render_chat(self, messages: list[dict], *, model: str | None = None) -> str:
        return self.get(model).render_chat(messages)

    def submit(self, prompt, params: SamplingParams, *, model: str | None = None, **kw) -> Request:
        return self.get(model).submit(prompt, params, **kw)

    def prepare(self, prompt, params: SamplingParams, *, model: str | None = None, messages=None) -> Prepared:
        return self.get(model).prepare(prompt, params, messages=messages)

    def enqueue(self, prep: Prepared, **kw) -> Request:
        return prep.engine.enqueue(prep, **kw)

    def cancel(self, request: Request) -> bool:
        return self._engines[request.model].cancel(request)

    def cancel_key(self, key) -> bool:
        return any(engine.cancel_key(key) for engine in self._engines.values())

    def cancel_owner(self, owner) -> int:
        return sum(engine.cancel_owner(owner) for engine in self._engines.values())

    def stats(self) -> dict:
        return {name: engine.stats() for name, engine in self._engines.items()}

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
