"""Engine wrappers of the service: token taps, and a ledger of each call's contexts.

Token taps stream the tokens of a semantic call's output while it is generated.
The scheduler's executor asks engines for whole results. To stream a variable, the service
wraps each engine in a `TappedEngine`: when someone listens to the output a generation is
producing, the generation runs as a stream and every token's text goes to the listeners; the
executor still gets the same `GenerateResult`. Without listeners nothing changes.

The output a generation produces is found from the executor's context id (`call<ID>-...`) and
the call's first unresolved output. If that naming ever changes, streams degrade gracefully to
one event carrying the whole value.

The ledger records the contexts each call fills and has not freed, so ending a session can free
what a cancelled call left behind (a call cancelled during its first fill never frees it).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable

from parrot_actors.errors import ParrotError
from parrot_actors.messages import GenerateResult
from parrot_actors.variables.variable import Variable

_CALL_CONTEXT = re.compile(r"^call(\d+)-")


class TokenTap:
    """Listeners per variable: `fn(text)` for each piece of generated text."""

    def __init__(self) -> None:
        self.listeners: dict[Variable, list[Callable[[str], None]]] = {}

    def listen(self, var: Variable, fn: Callable[[str], None]) -> Callable[[], None]:
        """Call `fn(text)` for every token text `var`'s generation yields from now on; returns
        the function that stops it."""
        self.listeners.setdefault(var, []).append(fn)

        def stop() -> None:
            fns = self.listeners.get(var, [])
            if fn in fns:
                fns.remove(fn)
            if not fns:
                self.listeners.pop(var, None)

        return stop

    def emit(self, var: Variable, text: str) -> None:
        """Send `text` to `var`'s listeners."""
        for fn in list(self.listeners.get(var, ())):
            fn(text)


def _call_id(context_id: str) -> int | None:
    m = _CALL_CONTEXT.match(context_id)
    return int(m.group(1)) if m else None


class TappedEngine:
    """An engine with `generate` tapped for listened-to outputs and the contexts of calls kept
    in a ledger; everything else is the wrapped engine's own (attribute access is forwarded).

    calls: the runtime's call table (call id -> `SemanticCall`), to find the output a context
    is generating. live: call id -> its context ids filled and not freed.
    """

    def __init__(self, engine: object, tap: TokenTap, calls: dict) -> None:
        self.inner = engine
        self.tap = tap
        self.calls = calls
        self.live: dict[int, set[str]] = {}

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def _output_of(self, context_id: str) -> Variable | None:
        cid = _call_id(context_id)
        call = self.calls.get(cid) if cid is not None else None
        if call is None:
            return None
        return next((v for v in call.outputs if not v.done()), None)

    async def fill(self, context_id: str, *args: object, **kwargs: object) -> object:
        """The engine's `fill`, recorded in the ledger first (it may be cancelled midway)."""
        cid = _call_id(context_id)
        if cid is not None:
            self.live.setdefault(cid, set()).add(context_id)
        return await self.inner.fill(context_id, *args, **kwargs)

    async def free_context(self, context_id: str) -> None:
        """The engine's `free_context`; the context leaves the ledger."""
        try:
            await self.inner.free_context(context_id)
        finally:
            cid = _call_id(context_id)
            ctxs = self.live.get(cid, set())
            ctxs.discard(context_id)
            if not ctxs:
                self.live.pop(cid, None)

    async def release(self, call_ids: Iterable[int]) -> int:
        """Free every context the calls `call_ids` left (they must have stopped); returns how
        many were still held."""
        freed = 0
        for cid in call_ids:
            for ctx in list(self.live.get(cid, ())):
                with contextlib.suppress(ParrotError):
                    await self.free_context(ctx)
                    freed += 1
        return freed

    async def generate(self, context_id: str, *args: object, **kwargs: object) -> object:
        """The engine's `generate`; a non-streamed one whose output has listeners streams
        internally and returns the same `GenerateResult`."""
        var = None if kwargs.get("stream") else self._output_of(context_id)
        if var is None or var not in self.tap.listeners:
            return await self.inner.generate(context_id, *args, **kwargs)
        result = await self.inner.generate(context_id, *args, **{**kwargs, "stream": True})
        if isinstance(result, GenerateResult):  # an engine that cannot stream
            self.tap.emit(var, result.text)
            return result
        ids: list[int] = []
        parts: list[str] = []
        finish = "length"
        async for delta in result:
            ids.append(delta.token_id)
            if delta.text:
                parts.append(delta.text)
                self.tap.emit(var, delta.text)
            finish = delta.finish_reason or finish
        return GenerateResult(
            token_ids=ids,
            text="".join(parts),
            finish_reason=finish,
            prompt_tokens=0,
            completion_tokens=len(ids),
        )
