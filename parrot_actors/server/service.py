"""The runtime a server shares among all its sessions."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from parrot_actors.runtime import Runtime
from parrot_actors.scheduler.config import SchedulerConfig
from parrot_actors.server.tap import TappedEngine, TokenTap


class SharedRuntime(Runtime):
    """The embedded runtime with every engine wrapped in a `TappedEngine` once started, so a
    variable can be streamed token by token (GET /v1/variables/{id}/stream).

    engines: `EngineConfig`s (started and closed by the runtime) or ready engine objects
    (e.g. `EchoEngine`; the caller owns them). Raises what `Runtime.start` raises.
    """

    def __init__(self, engines: Sequence[object], scheduler: SchedulerConfig | None = None) -> None:
        super().__init__(engines=list(engines), scheduler=scheduler)
        self.tap = TokenTap()

    async def start(self) -> None:
        """Start as the embedded runtime does, then route the scheduler's engine calls through
        the taps (the scheduler looks engines up by name in `scheduler.engines`)."""
        await super().start()
        self.engines = [TappedEngine(e, self.tap, self.calls) for e in self.engines]
        self.scheduler.engines = {e.name: e for e in self.engines}

    async def release_contexts(self, call_ids: Iterable[int]) -> int:
        """Free the engine contexts that the stopped calls `call_ids` still hold (see
        `TappedEngine.release`), and wait until every engine applied the frees already sent
        (those of cancelled calls included); returns how many contexts were still held."""
        ids = list(call_ids)
        freed = 0
        for engine in self.engines:
            if isinstance(engine, TappedEngine):
                freed += await engine.release(ids)
            await engine.flush()
        return freed
