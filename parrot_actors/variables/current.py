"""The runtime that semantic function calls go to, and the base every runtime shares.

Below the runtimes: the embedded `Runtime`, `RemoteRuntime` (HTTP) and `RayRuntime` all derive
from `CurrentRuntime`, and `semantic_function` finds the active one with `current_runtime()`,
so neither imports the others.
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING, TypeVar

from parrot_actors.errors import TemplateError

if TYPE_CHECKING:
    from parrot_actors.variables.graph import SemanticCall

_current: contextvars.ContextVar[CurrentRuntime | None] = contextvars.ContextVar(
    "parrot_actors_runtime", default=None
)

_R = TypeVar("_R", bound="CurrentRuntime")


class CurrentRuntime:
    """`async with` support shared by every runtime (embedded, HTTP, Ray): `start()`, then
    make the runtime current for semantic function calls; on exit, restore the previous one
    and `close()`. Subclasses define `start`, `close` and `submit`."""

    _token: contextvars.Token[CurrentRuntime | None] | None = None

    async def start(self) -> None:
        """Start the runtime (actors, sessions, connections)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Stop it; calls still running are cancelled."""
        raise NotImplementedError

    def submit(self, call: SemanticCall) -> None:
        """Add `call` to the graph (it runs once its inputs resolve and an output is wanted).
        Raises `CallError` for a cycle or an output that already has a producer or value."""
        raise NotImplementedError

    async def __aenter__(self: _R) -> _R:
        await self.start()
        self._token = _current.set(self)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._token is not None:
            _current.reset(self._token)
            self._token = None
        await self.close()


def current_runtime() -> CurrentRuntime:
    """The runtime of the enclosing `async with pa.Runtime(...)` (or `pa.connect(url)`, ...).
    Raises `TemplateError` when there is none."""
    rt = _current.get()
    if rt is None:
        raise TemplateError(
            "no runtime is active: call semantic functions inside "
            "`async with pa.Runtime(...) as rt:`"
        )
    return rt
