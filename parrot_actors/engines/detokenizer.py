"""Incremental detokenization with stop strings, for streaming and final text.

Text is decoded from all ids so far (tokenizers merge bytes across tokens), and a tail that
could still become a stop string, or that ends in an incomplete UTF-8 character, is held back
until it is resolved, so streamed text never has to be taken back.
"""

from __future__ import annotations


class Detokenizer:
    """Tracks one generation's text.

    add(token) -> (new text safe to show, whether a stop string has now appeared);
    final_text() -> the text, cut before the first stop string; flush() -> what final_text()
    holds beyond what add() already returned.
    """

    def __init__(self, tokenizer: object, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stop_at: int | None = None

    def add(self, token_id: int) -> tuple[str, bool]:
        """Account for one more token; return (delta text, stop string hit)."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            start = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stop_at = min(hits)
                return "", True
        safe = len(self.text)
        if self.text.endswith("\ufffd"):
            safe -= 1
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
        return self.text if self.stop_at is None else self.text[: self.stop_at]

    def flush(self) -> str:
        """Text of `final_text()` not yet returned by `add`."""
        rest = self.final_text()[self.emitted :]
        self.emitted += len(rest)
        return rest
