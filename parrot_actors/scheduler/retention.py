"""KV kept between the turns of a program: when a call of a session ends, its whole context
(prompt and answer) stays on its engine for the call's `retain_s`, so the session's next call,
whose prompt extends it (a multi-turn chat, a tool result appended), forks it at the token
level and computes only its new tokens. Source: Continuum (arXiv 2511.02230), which keeps an
agent's context through a tool call for a bounded time.

Bounds: one retained context per program (a newer turn replaces it), `max_contexts` in all
(the least recently kept goes first), each for at most its `retain_s`. A retained context is
an idle context like any other, so an engine short of KV drops its KV first (the next turn then
recomputes it, with the same result). Integer and string bookkeeping; the scheduler frees the
contexts this registry lets go.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from parrot_actors import clock


@dataclass(eq=False)
class Retained:
    """A kept context: its program, engine and id, its token ids, when it expires (`clock.now()`
    seconds), and the calls forking it right now (it is not freed under them)."""

    program: str
    engine: str
    context_id: str
    tokens: tuple[int, ...]
    expires_at: float
    users: int = 0


def common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    """How many leading token ids `a` and `b` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Retention:
    """The retained contexts of every program (see the module docstring).

    max_contexts: retained contexts at most, over all programs.
    """

    def __init__(self, max_contexts: int = 256) -> None:
        self.max_contexts = max_contexts
        self._by_program: OrderedDict[str, Retained] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_program)

    @property
    def tokens(self) -> int:
        """Token ids held by retained contexts, in all."""
        return sum(len(r.tokens) for r in self._by_program.values())

    def keep(
        self,
        program: str,
        engine: str,
        context_id: str,
        tokens: list[int],
        retain_s: float,
        now: float | None = None,
    ) -> list[Retained]:
        """Retain `context_id` for `program` for `retain_s` seconds. Returns the contexts to
        free now: the program's previous one, and the oldest beyond `max_contexts`."""
        now = clock.now() if now is None else now
        out = []
        old = self._by_program.pop(program, None)
        if old is not None:
            out.append(old)
        self._by_program[program] = Retained(
            program, engine, context_id, tuple(tokens), now + retain_s
        )
        while len(self._by_program) > self.max_contexts:
            _, oldest = self._by_program.popitem(last=False)
            out.append(oldest)
        return out

    def placements(self) -> list[tuple[str, str]]:
        """(program, engine) of every retained context."""
        return [(r.program, r.engine) for r in self._by_program.values()]

    def of(self, program: str | None) -> Retained | None:
        """The program's retained context, if any."""
        return self._by_program.get(program) if program is not None else None

    def lookup(self, program: str | None, engine: str) -> Retained | None:
        """The program's retained context if it is on `engine`."""
        r = self.of(program)
        return r if r is not None and r.engine == engine else None

    def engine_of(self, program: str | None) -> str | None:
        """The engine holding the program's retained context, if any."""
        r = self.of(program)
        return r.engine if r is not None else None

    def expired(self, now: float | None = None) -> list[Retained]:
        """Remove and return the retained contexts past their time that no call is forking."""
        now = clock.now() if now is None else now
        gone = [r for r in self._by_program.values() if r.expires_at <= now and r.users == 0]
        for r in gone:
            del self._by_program[r.program]
        return gone

    def next_expiry(self) -> float | None:
        """When the next retained context expires (`clock.now()` seconds), or None."""
        return min((r.expires_at for r in self._by_program.values()), default=None)

    def drop_engine(self, engine: str) -> list[Retained]:
        """Remove and return the retained contexts on `engine` (its contexts were lost)."""
        gone = [r for r in self._by_program.values() if r.engine == engine]
        for r in gone:
            del self._by_program[r.program]
        return gone

    def drop_all(self) -> list[Retained]:
        """Remove and return every retained context."""
        gone = list(self._by_program.values())
        self._by_program.clear()
        return gone
