"""Streaming text (llama.cpp's ``server-common`` token and UTF-8 helpers): one sequence's generated token bytes
become text an agent may see -- never a broken multibyte character, never the beginning of a stop string that
might still complete (the stop hold-back).

Named ``Detokenizer`` so that the project has one ``TextStream``, the SDK's (agentproc/llm.py), which is what an
agent iterates over.
"""
from __future__ import annotations

import codecs


class Detokenizer:
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
