"""Embedders: text -> L2-normalised float32 vectors, for the memory manager's semantic search (kernel/memory.py).

An embedder is anything with ``dim``, ``name`` and ``embed(texts)`` (the ``Embedder`` protocol).  Two exist:

- ``WordLlamaEmbedder`` -- the real one.  WordLlama (``wordllama`` 0.4.0.post1, config ``l2_supercat``, 256-d) is
  a token-embedding table distilled from Llama 2's: a text's vector is the mean of its tokens' rows, so it costs a
  tokenizer pass and a gather, no neural-network forward pass (thousands of texts/s on one core; figures in docs/memory.md).
  The weights (a 16 MB safetensors file) and the tokenizer ship inside the wheel; nothing is downloaded -- the
  load names the package's own files and disables downloads, and ``HF_HUB_OFFLINE`` is set for good measure.
- ``HashEmbedder`` -- **for unit tests only**: hashed character trigrams, deterministic and dependency-free, so
  tests do not depend on a model.  Texts that share trigrams are close; it knows nothing of meaning.

``default_embedder()`` is the one the kernel uses (WordLlama).  ``embed`` is thread-safe for both.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

DIM = 256
MAX_TOKENS_PER_CHUNK = 1024  # token rows gathered at once (1 MiB, stays in cache: 1.7x faster than 64k rows)


class Embedder(Protocol):
    """Turns texts into vectors.  ``embed(texts)`` returns float32 ``[len(texts), dim]`` whose rows have L2 norm
    1 (or are all zero for a text with no tokens), so cosine similarity is a dot product.  ``name`` identifies
    the model: vectors made under one name are not comparable with another's."""

    dim: int
    name: str

    def embed(self, texts: list[str]) -> np.ndarray: ...


def normalise(vectors: np.ndarray) -> np.ndarray:
    """``vectors`` (float32 ``[n, dim]``) with each row scaled to norm 1, in place; all-zero rows stay zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    np.divide(vectors, norms, out=vectors, where=norms > 0)
    return vectors


class WordLlamaEmbedder:
    """WordLlama ``l2_supercat`` at 256 dimensions, loaded once, lazily (first ``embed``), from the wheel's files.

    A text's vector is the mean of its tokens' embeddings, normalised -- what ``WordLlamaInference.embed(norm=
    True)`` computes, but without padding a batch to its longest text (a 64k-character entry would otherwise
    pad 63 short ones to its length): the token ids of a chunk of texts are concatenated and pooled with
    ``np.add.reduceat``, at most ``MAX_TOKENS_PER_CHUNK`` token rows at a time (a longer text alone).  Raises ``RuntimeError`` naming
    the missing file if the package is installed without its weights."""

    name = "wordllama-l2_supercat-256"
    dim = DIM

    def __init__(self):
        self._lock = threading.Lock()
        self._table: np.ndarray | None = None  # [vocab, dim] float32
        self._tokenizer = None

    def _load(self) -> None:
        with self._lock:
            if self._table is not None:
                return
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            root = logging.getLogger()
            handlers, level = list(root.handlers), root.level
            import wordllama  # its inference module calls logging.basicConfig(INFO) on import: undone below
            from wordllama import WordLlama

            root.handlers[:], root.level = handlers, level
            package = Path(wordllama.__file__).parent
            # Weights resolve from the package dir; its tokenizer lookup there uses a misspelt dir ("tokenizer/"
            # for "tokenizers/"), so the package dir is also given as the cache dir, which it spells right.
            try:
                model = WordLlama.load("l2_supercat", dim=DIM, cache_dir=package, disable_download=True)
            except FileNotFoundError as e:
                raise RuntimeError(f"wordllama's bundled model is missing ({e}); reinstall it: "
                                   "pip install --force-reinstall wordllama==0.4.0.post1") from e
            tokenizer = model.tokenizer
            tokenizer.no_padding()
            self._tokenizer = tokenizer
            self._table = model.embedding

    def embed(self, texts: list[str]) -> np.ndarray:
        """Vectors for ``texts`` (float32 ``[len(texts), 256]``, rows normalised)."""
        if self._table is None:
            self._load()
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        if not texts:
            return out
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(texts))
        start = 0
        while start < len(texts):
            end, tokens = start + 1, int(lengths[start])  # at least one text, however long
            while end < len(texts) and tokens + lengths[end] <= MAX_TOKENS_PER_CHUNK:
                tokens += int(lengths[end])
                end += 1
            self._pool(encodings[start:end], lengths[start:end], out[start:end])
            start = end
        return normalise(out)

    def _pool(self, encodings, lengths: np.ndarray, out: np.ndarray) -> None:
        """Mean token embedding of each encoding into ``out``'s rows (texts without tokens stay zero)."""
        ids = np.fromiter((i for e in encodings for i in e.ids), dtype=np.int64, count=int(lengths.sum()))
        if ids.size == 0:
            return
        np.clip(ids, 0, self._table.shape[0] - 1, out=ids)
        nonempty = lengths > 0
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))[nonempty]
        sums = np.add.reduceat(self._table[ids], offsets, axis=0)
        out[nonempty] = sums / lengths[nonempty, None]


class HashEmbedder:
    """**Test-only** embedder: each lower-cased character trigram of `` text `` adds +-1 to one of ``dim`` buckets
    (both chosen by a stable hash, blake2b), then the row is normalised.  Deterministic across processes and
    machines, no model needed; similarity is lexical overlap, not meaning -- never use it for real memory."""

    name = "hash-trigram"

    def __init__(self, dim: int = DIM):
        self.dim = dim

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            padded = f" {text.lower()} "
            for i in range(len(padded) - 2):
                h = int.from_bytes(hashlib.blake2b(padded[i:i + 3].encode(), digest_size=8).digest(), "little")
                out[row, h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
        return normalise(out)


_default: WordLlamaEmbedder | None = None
_default_lock = threading.Lock()


def default_embedder() -> Embedder:
    """The kernel's embedder: one shared ``WordLlamaEmbedder`` per process (its model loads on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = WordLlamaEmbedder()
        return _default
