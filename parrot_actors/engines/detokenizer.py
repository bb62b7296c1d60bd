"""Incremental detokenization with stop strings, for streaming and final text.

Each token's text comes from `tokenizers.decoders.DecodeStream` (the library's incremental
decoder: constant work per token, multi-byte characters held until complete) over the fast
tokenizer's backend; a tokenizer without one (a slow or fake tokenizer) is decoded from all ids
so far instead. A tail that could still become a stop string is held back until it is resolved,
so streamed text never has to be taken back. The final text is one `decode` of every id, so it
equals what `tokenizer.decode(ids, skip_special_tokens=True)` gives (a trailing incomplete
character included, as the replacement character).
"""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream


class Detokenizer:
    """Tracks one generation's text.

    add(token) -> (new text safe to show, whether a stop string has now appeared);
    final_text() -> the text, cut before the first stop string; flush() -> what final_text()
    holds beyond what add() already returned.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stop_at: int | None = None
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = DecodeStream(skip_special_tokens=True) if self._backend else None
        self._final: str | None = None

    def _piece(self, token_id: int) -> str:
        if self._stream is not None and self._backend is not None:
            return self._stream.step(self._backend, token_id) or ""
        whole = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if whole.endswith("\ufffd"):  # an incomplete character: wait for its other bytes
            whole = whole[:-1]
        return whole[len(self.text) :] if whole.startswith(self.text) else ""

    def add(self, token_id: int) -> tuple[str, bool]:
        """Account for one more token; return (delta text, stop string hit)."""
        self.ids.append(token_id)
        self.text += self._piece(token_id)
        if self.stop:
            start = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stop_at = min(hits)
                return "", True
        safe = len(self.text)
        for s in self.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if self.text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        safe = max(safe, self.emitted)
        delta = self.text[self.emitted : safe]
        self.emitted = safe
        return delta, False

    def final_text(self) -> str:
        """The generation's text, cut before the first stop string."""
        if self.stop_at is not None:
            return self.text[: self.stop_at]
        if self._final is None:
            self._final = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._final

    def flush(self) -> str:
        """Text of `final_text()` not yet returned by `add`."""
        rest = self.final_text()[self.emitted :]
        self.emitted += len(rest)
        return rest
