"""The set of models (llama.cpp's ``server-models``): one ``Engine`` per model the kernel serves, each with its own
thread, context and scheduler -- or a ``RemoteCore`` (remote.py) for a model an OpenAI-compatible server serves --
and the routing of requests to them by name.
"""
from __future__ import annotations

import os

from kernel.llm.engine import Engine, Prepared, Sink
from kernel.llm.request import DEFAULT_MODEL, EngineError, Request, SamplingParams


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
                          n_threads=llm.threads or None, n_batch=pick("n_batch"), scheduler=llm.scheduler,
                          max_active=min(pick("max_active"), pick("n_seq_max")), kv_size=pick("kv_size") or None,
                          kv_unified=kv_unified(llm),
                          rr_slice=llm.rr_slice, swap_ram_mb=llm.swap_ram_mb, swap_disk_mb=llm.swap_disk_mb,
                          swap_dir=os.path.join(swap_dir, name) if swap_dir else None, snapshots=llm.snapshots,
                          share_prefix=llm.share_prefix == "all", prefill_chunk=llm.prefill_chunk)

        from kernel.llm.remote import RemoteCore  # an OpenAI-compatible server as a core (docs/remote.md)

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
