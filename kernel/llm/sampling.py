"""Sampling chains and grammar (llama.cpp's ``common/sampling``): each request's C sampler chain, the grammar a
``json_schema`` becomes (bounded first by kernel/llm/grammar.py), and sampling one row of logits under it.

Unconstrained sampling is one C call (``llama_sampler_sample``).  Constrained sampling follows llama.cpp's
``common_sampler``: sample freely, and only when the grammar rejects that token sample again under the grammar
(``Sampler.sample``).  The engine thread owns one ``Sampler`` (its candidate buffers); chains are per request.
"""
from __future__ import annotations

import ctypes
import json
import math
import random

import llama_cpp
import numpy as np

from kernel.llm.grammar import SchemaError, check_grammar, check_schema
from kernel.llm.request import EngineError, SamplingParams

_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data
GRAMMAR_CANDIDATES = 512  # a grammar-rejected token: first try the grammar on this many most likely tokens


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


def make_samplers(vocab, p: SamplingParams, grammar_text: str | None):
    """A new C sampler chain for ``p`` (greedy when temperature is 0, else top_k, top_p, temp, dist(seed)) and
    the grammar sampler of ``grammar_text`` (or None), for the model whose vocabulary is ``vocab`` (alive for
the call: the engine holds its model lock)."""
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
    grammar = llama_cpp.llama_sampler_init_grammar(vocab, grammar_text.encode(), b"root")
    if not grammar:
        llama_cpp.llama_sampler_free(chain)
        raise EngineError("EINVAL", "json_schema: llama.cpp rejected the grammar made from it")
    return chain, grammar


def free_samplers(*samplers) -> None:
    """Free C samplers (None entries skipped)."""
    for s in samplers:
        if s:
            llama_cpp.llama_sampler_free(s)


class Sampler:
    """Samples rows of logits for one engine thread (its model has ``n_vocab`` tokens); owns the candidate
    buffers that constrained sampling reuses."""

    def __init__(self, n_vocab: int):
        self._n_vocab = n_vocab
        self._cur = None  # numpy llama_token_data[n_vocab] for constrained sampling, made on first use
        self._vocab_ids = None  # numpy 0..n_vocab-1
        self._one = np.zeros(1, _TOKEN_DATA)
        self._top = np.zeros(GRAMMAR_CANDIDATES, _TOKEN_DATA)

    def sample(self, ctx, row: int, chain, grammar, greedy: bool = False) -> int:
        """The next token from batch row ``row`` of ``ctx``'s logits: the C sampler ``chain``, constrained by the
        ``grammar`` sampler if any; -1 when the grammar allows no token.  ``greedy``: ``chain`` is the greedy
        sampler alone (temperature 0)."""
        if grammar is None:
            if greedy:
                # What llama.cpp's greedy sampler selects -- the first token of highest logit -- without building
                # its candidate array of the whole vocabulary (~1 ms for 262k tokens, docs/engine.md "Profile");
                # the greedy sampler keeps no state, so there is nothing to accept.
                return int(np.argmax(self._logits(ctx, row)))
            return llama_cpp.llama_sampler_sample(chain, ctx, row)
        # As llama.cpp's common_sampler: sample unconstrained, and only if the grammar rejects that token sample
        # again under the grammar -- first among the GRAMMAR_CANDIDATES most likely tokens (about 1 ms), and only
        # if it allows none of those over the whole vocabulary (~50-250 ms for 262k tokens, during which every
        # other sequence of the batch waits).  Greedy choices are exactly those of the full-vocabulary
        # pass; a sampled one is drawn from the most likely allowed tokens, as under top_k = GRAMMAR_CANDIDATES.
        logits = self._logits(ctx, row)
        token = self._apply(chain, logits)
        if token < 0 or not self._allows(grammar, token):
            token = self._apply_top(chain, logits, grammar)
        if token < 0:
            token = self._apply(chain, logits, grammar)
        if token >= 0:
            llama_cpp.llama_sampler_accept(grammar, token)
            llama_cpp.llama_sampler_accept(chain, token)
        return token

    def _logits(self, ctx, row: int):
        """Batch row ``row``'s logits, a numpy view (valid until the next decode)."""
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, row), shape=(self._n_vocab,))

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
