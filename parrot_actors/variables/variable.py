"""Semantic Variables: awaitable, future-like values that connect LLM calls into a graph."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, Protocol

from parrot_actors.errors import CallError, ParrotError
from parrot_actors.variables.perf import LATENCY, check_objective

if TYPE_CHECKING:
    from parrot_actors.variables.graph import SemanticCall

_ids = itertools.count()


class VariableError(ParrotError):
    """A variable was used wrongly (set twice, set while a call produces it)."""


class VariableOwner(Protocol):
    """The runtime a variable reports to (see `Variable.attach`)."""

    def on_demand(self, var: Variable, perf: str) -> None:
        """Someone awaits `var` with objective `perf`."""
        ...

    def on_cancel(self, var: Variable) -> None:
        """The app cancelled `var` (before it settled)."""
        ...

    def on_settled(self, var: Variable) -> None:
        """`var` got its value or its error."""
        ...


class Variable:
    """A Semantic Variable (Parrot, OSDI 2024, §4): a text value produced by at most one call
    (its producer) and read by any number of calls (its consumers).

    `await var` or `await var.get(perf=pa.LATENCY | pa.THROUGHPUT)` returns the value (str),
    telling the runtime how urgently it is wanted; `set(value)` resolves a variable with no
    producer (once). When it resolves, it notifies the consumers' runtime; nothing polls.
    Errors: `get` raises `CallError` if the producer (or anything upstream) failed or was
    cancelled; `set` raises `VariableError` on a second set or on a produced variable.

    Runtimes use `attach`, `resolve`, `fail`, `error` and `awaited`; apps never need them.
    """

    def __init__(self, value: object | None = None, name: str | None = None) -> None:
        self.id = f"v{next(_ids)}"
        self.name = name or self.id
        self.producer: SemanticCall | None = None
        self.consumers: list[SemanticCall] = []
        self._value: str | None = None
        self._error: BaseException | None = None
        self._done = False
        self._waiters: list[asyncio.Future[None]] = []
        self._owner: VariableOwner | None = None
        self.parser: Callable[[str], object] | None = None
        if value is not None:
            self.set(value)

    def __repr__(self) -> str:
        state = "done" if self._done else "pending"
        return f"Variable({self.name!r}, id={self.id}, {state})"

    def done(self) -> bool:
        """True once the variable holds a value or an error."""
        return self._done

    def value(self) -> str:
        """The value of a resolved variable. Raises `VariableError` if not resolved, or the
        producer's `CallError`."""
        if not self._done:
            raise VariableError(f"variable {self.name!r} has no value yet")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def set(self, value: object) -> None:
        """Give the variable its value (str() of `value`). Raises `VariableError` if it is
        already set or a call produces it."""
        if self.producer is not None:
            raise VariableError(f"variable {self.name!r} is produced by a call; it cannot be set")
        if self._done:
            raise VariableError(f"variable {self.name!r} is already set")
        self.resolve(str(value))

    def cancel(self) -> bool:
        """Cancel the variable: its producer stops if it has not finished, and every `get`
        here and downstream raises `CallError`. False if it had already resolved."""
        if self._done:
            return False
        if self._owner is not None:
            self._owner.on_cancel(self)
        if not self._done:
            self.fail(CallError(f"variable {self.name!r} was cancelled"))
        return True

    async def get(self, perf: str = LATENCY) -> str:
        """Wait for the value; `perf` is the objective of this wait (LATENCY or THROUGHPUT),
        which the runtime propagates to the producer and everything upstream."""
        check_objective(perf)
        if not self._done:
            if self._owner is not None:
                self._owner.on_demand(self, perf)
        if not self._done:  # the demand itself may have settled it (e.g. a call that failed)
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            await fut
        return self.value()

    def __await__(self) -> Generator[Any, None, str]:
        return self.get().__await__()

    async def parsed(self, perf: str = LATENCY) -> object:
        """The value parsed by the output's constraint: a dict (or list, number...) for
        `json_schema=` a schema, an instance for `json_schema=` a pydantic model class, the
        text for `regex=`, `choices=` or no constraint. Raises what `get` raises, and
        `VariableError` naming the variable if the text does not parse (an output cut short
        by `max_tokens`)."""
        text = await self.get(perf)
        if self.parser is None:
            return text
        try:
            return self.parser(text)
        except Exception as exc:
            raise VariableError(
                f"variable {self.name!r} does not parse ({exc}); text: {text[:200]!r}"
            ) from None

    # ---- the runtime's side ------------------------------------------------------------------

    @property
    def error(self) -> BaseException | None:
        """The error of a variable that failed (None while pending or once it has a value)."""
        return self._error

    @property
    def awaited(self) -> bool:
        """True while some `get` waits for the value."""
        return bool(self._waiters)

    def attach(self, owner: VariableOwner) -> None:
        """Report demands, cancels and settlement to `owner` (the runtime the variable is used
        in; a later runtime takes over). Settled already: `owner.on_settled` runs at once."""
        self._owner = owner
        if self._done:
            owner.on_settled(self)

    def owned_by(self, owner: VariableOwner) -> bool:
        """True if `owner` is the runtime the variable reports to."""
        return self._owner is owner

    def resolve(self, value: str) -> None:
        """Settle with `value` (a producer's output); nothing happens once settled."""
        if self._done:
            return
        self._value = value
        self._settle()

    def fail(self, error: BaseException) -> None:
        """Settle with `error`: every `get` here raises it; nothing happens once settled."""
        if self._done:
            return
        self._error = error
        self._settle()

    def _settle(self) -> None:
        self._done = True
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()
        if self._owner is not None:
            self._owner.on_settled(self)
