"""Token taps: listeners of a semantic call's output while it is generated.

The service streams a variable (GET /v1/variables/{id}/stream, and the OpenAI API's streamed
answers) by listening to it here; the executor asks `listening(var)` before each output and,
when someone listens, generates it with `generate_stream` and emits every `TokenDelta` with the
index of the choice it belongs to (0, or 0..n-1 for `n` samples). Nobody listening: a plain
`generate`.
"""

from __future__ import annotations

from collections.abc import Callable

from parrot_actors.messages import TokenDelta
from parrot_actors.variables.variable import Variable

Listener = Callable[[TokenDelta, int], None]
"""`fn(delta, choice index)`."""


class TokenTap:
    """Listeners per variable."""

    def __init__(self) -> None:
        self._listeners: dict[Variable, list[Listener]] = {}

    def listen(self, var: Variable, fn: Listener) -> Callable[[], None]:
        """Call `fn(delta, index)` for every token `var`'s generation yields from now on;
        returns the function that stops it."""
        self._listeners.setdefault(var, []).append(fn)

        def stop() -> None:
            fns = self._listeners.get(var, [])
            if fn in fns:
                fns.remove(fn)
            if not fns:
                self._listeners.pop(var, None)

        return stop

    def listening(self, var: Variable) -> bool:
        """True if someone listens to `var`."""
        return var in self._listeners

    def emit(self, var: Variable, delta: TokenDelta, index: int = 0) -> None:
        """Send `delta` of choice `index` to `var`'s listeners."""
        for fn in list(self._listeners.get(var, ())):
            fn(delta, index)
