"""Token taps: listeners of a semantic call's output text while it is generated.

The service streams a variable (GET /v1/variables/{id}/stream) by listening to it here; the
executor asks `listening(var)` before each output and, when someone listens, generates it with
`generate_stream` and emits each piece of text. Nobody listening: a plain `generate`.
"""

from __future__ import annotations

from collections.abc import Callable

from parrot_actors.variables.variable import Variable


class TokenTap:
    """Listeners per variable: `fn(text)` for each piece of generated text."""

    def __init__(self) -> None:
        self._listeners: dict[Variable, list[Callable[[str], None]]] = {}

    def listen(self, var: Variable, fn: Callable[[str], None]) -> Callable[[], None]:
        """Call `fn(text)` for every piece of text `var`'s generation yields from now on;
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

    def emit(self, var: Variable, text: str) -> None:
        """Send `text` to `var`'s listeners."""
        for fn in list(self._listeners.get(var, ())):
            fn(text)
