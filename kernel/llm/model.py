"""Model loading and tokenisation: the loaded llama.cpp model, its vocabulary and chat template.

Where model files live and how the embedded default one is assembled is ``kernel/models.py``'s (the kernel's
state directory, read by ``aiosd`` and the test kit without loading llama.cpp).  ``Model.load`` reads a GGUF file
with llama.cpp (weights not repacked: ``use_extra_bufts = False``, see kernel/llm/engine.py's docstring) and finds
its chat template; ``tokenize``, ``render_chat`` and ``piece`` read the vocabulary.  A ``Model`` is only data plus pure functions of it: the engine
decides on which thread and under which lock each is called (kernel/llm/engine.py).
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading

import llama_cpp

from kernel.llm.request import EngineError

log = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant")
# A model file without a chat template (a base model) gets its family's built-in llama.cpp template; llama.cpp
# itself would silently use ChatML, whose markers such a model has never seen.
BUILTIN_CHAT_TEMPLATES = {"gemma": b"gemma", "gemma2": b"gemma", "gemma3": b"gemma", "gemma3n": b"gemma"}

_backend_lock = threading.Lock()
_backend_ready = False
_LLAMA_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level WARN, ERROR; DEBUG/INFO dropped


@llama_cpp.llama_log_callback
def _llama_log(level: int, text: bytes, user_data) -> None:
    """llama.cpp's log lines: warnings and errors to our logger, the (very chatty) rest dropped."""
    if level in _LLAMA_LOG_LEVELS:
        log.log(_LLAMA_LOG_LEVELS[level], "llama.cpp: %s", text.decode("utf-8", errors="replace").rstrip())


def backend_init() -> None:
    """Once per process: route llama.cpp's logging to ours and initialise its backend."""
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_log_set(_llama_log, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True


class Model:
    """A GGUF model file loaded with llama.cpp: ``vocab``, ``n_vocab``, ``n_swa`` (its sliding window, 0 for
    none) and ``chat_template`` once ``load``ed, until ``free``."""

    def __init__(self, path: str):
        self.path = str(path)
        self.model = None  # llama_model pointer while loaded
        self.vocab = None
        self.n_vocab = 0
        self.n_swa = 0
        self.chat_template: bytes | None = None
        self._piece_buf = ctypes.create_string_buffer(256)  # piece() is for the engine thread only

    @property
    def name(self) -> str:
        """The model file's basename (for logs)."""
        return os.path.basename(self.path)

    @property
    def loaded(self) -> bool:
        return bool(self.model)

    def load(self) -> None:
        """Load the file; raise ``EngineError("EIO")`` saying what failed."""
        if not os.path.isfile(self.path):
            raise EngineError("EIO", f"model file {self.path} does not exist (run `make install`)")
        backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.use_extra_bufts = False  # no repacked weights: faster here, and one batch-shape switch less
        self.model = llama_cpp.llama_model_load_from_file(self.path.encode(), mp)
        if not self.model:
            raise EngineError("EIO", f"llama.cpp could not load {self.path}: not a GGUF model it supports, "
                              "or a truncated file (delete it and run `make install`)")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_swa = max(0, llama_cpp.llama_model_n_swa(self.model))
        self.chat_template = self._find_chat_template()

    def free(self) -> None:
        """Free the weights (idempotent); every context made from them must be freed first."""
        if self.model:
            llama_cpp.llama_model_free(self.model)
        self.model = self.vocab = None

    def _find_chat_template(self) -> bytes:
        """The model's own chat template, else the built-in one of its architecture, else ChatML."""
        tmpl = llama_cpp.llama_model_chat_template(self.model, None)
        if tmpl:
            return tmpl
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_model_meta_val_str(self.model, b"general.architecture", buf, len(buf))
        arch = buf.value.decode() if n > 0 else "?"
        if arch in BUILTIN_CHAT_TEMPLATES:
            return BUILTIN_CHAT_TEMPLATES[arch]
        log.warning("engine: %s has no chat template and architecture %s has no built-in one; using ChatML",
                    self.name, arch)
        return b"chatml"

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """The model's tokens for ``text`` (BOS first when ``add_bos``; control tokens such as
        ``<start_of_turn>`` parsed when ``special``)."""
        data = text.encode("utf-8", errors="replace")
        cap = len(data) + 8
        while True:
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_bos, special)
            if n >= 0:
                return buf[:n]
            cap = -n

    def render_chat(self, chat) -> str:
        """Render ``chat`` (what ``chat_messages`` made of the messages) with the model's own chat template,
        ending in an open assistant turn."""
        arr, n_msgs, size = chat
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_chat_apply_template(self.chat_template, arr, n_msgs, True, buf, size)
            if n < 0:
                raise EngineError("EIO", f"llama.cpp does not support the chat template of {self.name}")
            if n <= size:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = n

    def piece(self, token: int) -> bytes:
        """The bytes of ``token`` (control tokens render as nothing).  Engine thread only (one shared buffer)."""
        buf = self._piece_buf
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            self._piece_buf = buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return ctypes.string_at(buf, max(n, 0))

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends a generation (end of turn, end of text)."""
        return llama_cpp.llama_vocab_is_eog(self.vocab, token)


def chat_messages(messages: list[dict]):
    """Check ``messages`` (``[{"role": "system"|"user"|"assistant", "content": str}]``) and convert them for llama.cpp: ``(array, count, a first buffer size)``; raises
    ``EngineError("EINVAL")`` naming the first bad message.  Needs no model."""
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
    return arr, len(messages), 2 * total + 256
