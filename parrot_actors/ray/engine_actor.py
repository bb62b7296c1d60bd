"""The engine as a Ray actor: the unchanged `Engine` inside an async actor body.

This module does not import Ray: `spawn.py` wraps `EngineActor` with `ray.remote`. Ray actors
cannot have an async `__init__` (Ray docs, "AsyncIO / Concurrency for Actors"), so the engine is
built on the first call; every method awaits it. A new `incarnation` id is drawn each time Ray
(re)starts the actor, so proxies can tell that a restarted actor lost its contexts.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

from parrot_actors.engines.api import Tokenizer
from parrot_actors.engines.engine import Engine, EngineConfig
from parrot_actors.errors import InvalidRequestError
from parrot_actors.messages import TokenDelta
from parrot_actors.ray.wire import EngineInfo, OpResult

OPS = frozenset({"fill", "generate", "free_context"})
"""Engine operations an actor forwards with `call` (streams go through `stream`)."""


class EngineActor:
    """Hosts one `Engine` built from `config`: the engine API through `call(op, *args)` and
    `stream(*args)`, plus `info()`, `tokenizer()`, `stats()` and `ping()`.
    group: the id (hex) of the placement group it was placed in (for `shutdown_deployment`).

    Operations answer an `OpResult`: the result with the incarnation and the engine's stats
    after the operation (one round trip keeps the proxy's cached stats fresh). Errors are the
    engine's own (`ContextNotFoundError`, `InvalidRequestError`, `CapacityError`,
    `EngineError`); Ray wraps them in `RayTaskError` and the proxy unwraps them.
    """

    def __init__(self, config: EngineConfig, group: str = "") -> None:
        self.config = config
        self.group = group
        self.incarnation = uuid.uuid4().hex[:12]
        self._engine: Engine | None = None
        self._starting: asyncio.Task[Engine] | None = None

    async def _get(self) -> Engine:
        if self._engine is None:
            if self._starting is None:
                self._starting = asyncio.ensure_future(Engine.start(self.config))
            self._engine = await asyncio.shield(self._starting)
        return self._engine

    async def ping(self) -> str:
        """The incarnation id, once the engine is built (seconds on first call: model load)."""
        await self._get()
        return self.incarnation

    async def info(self) -> EngineInfo:
        """Name, served model, aliases, incarnation and stats."""
        engine = await self._get()
        return EngineInfo(
            name=engine.name,
            model_name=engine.model_name,
            aliases=tuple(engine.aliases),
            incarnation=self.incarnation,
            group=self.group,
            stats=engine.stats(),
        )

    async def tokenizer(self) -> Tokenizer:
        """The engine's tokenizer object (pickled by Ray), so proxies tokenize locally without
        the model files on their node."""
        return (await self._get()).tokenizer

    async def stats(self) -> OpResult:
        """The current stats (the value is None)."""
        engine = await self._get()
        return OpResult(None, self.incarnation, engine.stats())

    async def call(self, op: str, *args: object) -> OpResult:
        """`engine.<op>(*args)` for op in `OPS` (the engine API's signatures, forwarded as
        they are); the value is the operation's result. Raises `InvalidRequestError` for any
        other op, and the engine's own errors."""
        if op not in OPS:
            raise InvalidRequestError(f"engine actor op {op!r}: allowed are {sorted(OPS)}")
        engine = await self._get()
        result = await getattr(engine, op)(*args)
        return OpResult(result, self.incarnation, engine.stats())

    async def stream(self, *args: Any) -> AsyncIterator[TokenDelta]:
        """`engine.generate_stream(*args)` (its signature, forwarded as it is): one
        `TokenDelta` per token. Call it with `num_returns="streaming"` (Ray generators);
        cancelling the generator ref stops it."""
        engine = await self._get()
        async for delta in engine.generate_stream(*args):
            yield delta

    async def close(self) -> None:
        """Stop the engine (its requests fail with `EngineError`)."""
        if self._engine is not None:
            await self._engine.close()
