"""The LLM engine as a package, split by role as llama.cpp's server is (docs/engine.md):

| module | role | llama.cpp's counterpart |
|---|---|---|
| ``request.py`` | request parameters, their validation, the request handle, ``EngineError`` | ``server-task`` |
| ``text.py`` | streaming text: incremental UTF-8 and the stop-string hold-back (``Detokenizer``) | ``server-common`` |
| ``sampling.py`` | sampler chains, ``json_schema`` -> grammar, constrained sampling | ``common/sampling`` |
| ``grammar.py`` | bounds on what a ``json_schema`` may make the kernel build | |
| ``slots.py`` | slots, KV residency, prefix reuse, eviction | ``server-context`` (slots) |
| ``swap.py`` | snapshots of evicted sequences in RAM and on disk, exact restore | |
| ``scheduler.py`` | who runs next (``fifo``, ``rr``, ``fair``), minimum quantum, shedding | |
| ``model.py`` | model loading, tokenisation, chat templates (files: kernel/models.py) | ``common`` |
| ``engine.py`` | the engine thread and its step loop; one hand-off of events a step | ``update_slots`` / ``examples/parallel`` |
| ``models.py`` | the set of models the kernel serves | ``server-models`` |
| ``remote.py`` | a remote core: an OpenAI-compatible server behind the same interface and scheduler (docs/remote.md) | |

The kernel imports what it needs from here; the names load lazily, so that importing ``kernel.llm.scheduler``
(as kernel/config.py does) does not load llama.cpp.
"""
import importlib

_EXPORTS = {"Engine": "engine", "Prepared": "engine", "Engines": "models", "kv_unified": "models",
            "DEFAULT_MODEL": "request", "EngineError": "request", "Request": "request", "SamplingParams": "request"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kernel.llm' has no attribute {name!r}")
    return getattr(importlib.import_module(f"kernel.llm.{module}"), name)
